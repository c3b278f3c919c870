-- wrk script: every request is an async `shared` provision of a new instance id.
-- Environment: BENCH_AUTH (base64 user:password), BENCH_TAG (unique per run).
-- done() prints one line "BENCHJSON {...}" with the figures (latency in microseconds).
local service_id = "3bdd3b6c-801f-470b-a45f-bc1849fa2124"
local plan_id = "707a3e6f-f8db-4339-88da-1533837a9810"
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  counter = 0
  prefix = "load-" .. (os.getenv("BENCH_TAG") or "x") .. "-" .. tid .. "-"
  wrk.method = "PUT"
  wrk.headers["Authorization"] = "Basic " .. os.getenv("BENCH_AUTH")
  wrk.headers["X-Broker-API-Version"] = "2.17"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = '{"service_id":"' .. service_id .. '","plan_id":"' .. plan_id ..
             '","organization_guid":"o","space_guid":"s"}'
end

function request()
  counter = counter + 1
  return wrk.format(nil, "/v2/service_instances/" .. prefix .. counter .. "?accepts_incomplete=true")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"non_2xx":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
