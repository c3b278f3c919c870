# Shell helpers for the dashboard's page tests. Source this file.
# browser_ensure_installed: installs Debian's chromium and chromium-driver when `chromium` or `chromedriver`
# is missing (the e2e test drives the browser through chromedriver, headless).

browser_ensure_installed() {
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then return; fi
  echo "installing chromium and chromium-driver (apt-get)..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
  command -v chromium >/dev/null && command -v chromedriver >/dev/null \
    || { echo "chromium or chromedriver still not found after apt-get install chromium chromium-driver" >&2; exit 1; }
}
