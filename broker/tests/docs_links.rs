//! The README and docs/ stay whole: every relative link in README.md and docs/*.md points at a file that
//! exists (and, for a Markdown target, at a heading it has), and the README fits on a page.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

/// The README is the first page a newcomer reads: the commands, what berth is, a short tour, links.
const README_MAX_LINES: usize = 130;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// README.md, CHANGELOG.md and every Markdown page under docs/ (README first).
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![repo().join("README.md"), repo().join("CHANGELOG.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The text outside fenced code blocks and inline code, where links are links.
fn prose(markdown: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            let mut in_code = false;
            for c in line.chars() {
                if c == '`' {
                    in_code = !in_code;
                } else if !in_code {
                    out.push(c);
                }
            }
            out.push('\n');
        }
    }
    out
}

/// Targets of inline links `[text](target)` and images.
fn link_targets(markdown: &str) -> Vec<String> {
    let text = prose(markdown);
    let mut targets = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("](") {
        let after = &rest[start + 2..];
        let Some(end) = after.find(')') else { break };
        let target = after[..end].split_whitespace().next().unwrap_or("");
        targets.push(target.to_string());
        rest = &after[end..];
    }
    targets
}

/// GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as `-`, repeats numbered.
fn anchors(markdown: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let heading = line.trim_start_matches('#').trim();
        let slug: String = heading
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut unique = slug.clone();
        let mut n = 1;
        while seen.contains(&unique) {
            unique = format!("{slug}-{n}");
            n += 1;
        }
        seen.insert(unique);
    }
    seen
}

fn broken_links(page: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(page).unwrap();
    let mut broken = Vec::new();
    for target in link_targets(&text) {
        if target.contains("://") || target.starts_with("mailto:") || target.is_empty() {
            continue;
        }
        let (path, anchor) = match target.split_once('#') {
            Some((path, anchor)) => (path, Some(anchor)),
            None => (target.as_str(), None),
        };
        let file = if path.is_empty() {
            page.to_path_buf()
        } else {
            page.parent().unwrap().join(path)
        };
        if !file.exists() {
            broken.push(format!("{target}: no such file"));
            continue;
        }
        if let Some(anchor) = anchor
            && file.extension().is_some_and(|x| x == "md")
            && !anchors(&std::fs::read_to_string(&file).unwrap()).contains(anchor)
        {
            broken.push(format!("{target}: no heading with that anchor"));
        }
    }
    broken
}

#[test]
fn every_relative_link_in_the_readme_and_docs_points_at_something() {
    let mut broken = Vec::new();
    for page in pages() {
        for problem in broken_links(&page) {
            broken.push(format!("{}: {problem}", page.display()));
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn every_docs_page_is_linked_from_the_readme() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let linked: HashSet<String> = link_targets(&readme)
        .into_iter()
        .map(|t| t.split('#').next().unwrap().to_string())
        .collect();
    for page in pages().into_iter().skip(2) {
        let name = format!("docs/{}", page.file_name().unwrap().to_str().unwrap());
        assert!(linked.contains(&name), "README.md does not link {name}");
    }
}

#[test]
fn the_readme_fits_on_a_page_and_starts_with_the_two_commands() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines; keep it under {README_MAX_LINES} and move detail into docs/"
    );
    // CI reads the test command from the README: the first code block holds both commands.
    let first_block = readme.split("```").nth(1).expect("a code block");
    assert!(first_block.contains("./start.sh"), "{first_block}");
    assert!(first_block.contains("./scripts/test.sh"), "{first_block}");
}

#[test]
fn the_link_checker_sees_a_broken_link_and_a_broken_anchor() {
    let dir = std::env::temp_dir().join(format!("berth-docs-links-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("page.md");
    std::fs::write(
        &page,
        "# A page\n## Sync and async (OSB `2.17`)\n[ok](#sync-and-async-osb-217) [self](page.md#a-page)\n\
         [gone](missing.md) [bad](page.md#nowhere) [web](https://example.com/x.md)\n\
         ```\n[in code](nothing.md)\n```\n",
    )
    .unwrap();
    let broken = broken_links(&page);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        broken,
        vec![
            "missing.md: no such file".to_string(),
            "page.md#nowhere: no heading with that anchor".to_string()
        ]
    );
}
