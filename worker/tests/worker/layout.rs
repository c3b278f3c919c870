//! The layout rule, read from the sources: no engine (a folder under `providers/` with an
//! `impl Provider for`) is named outside its own folder, except by `providers/mod.rs`, which builds them.
//! Shared code lives in modules of its own (`providers/postgres/`, `providers/aws/`, ...), never in an
//! engine another engine borrows from.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// One `crate::...` path a file names, resolved to segments after `crate`, with its line.
#[derive(Debug, PartialEq)]
struct Named {
    line: usize,
    path: Vec<String>,
}

#[test]
fn no_engine_is_named_outside_its_own_folder() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let engines = engines(&src.join("providers"));
    for expected in [
        "shared_postgres",
        "local_postgres",
        "ec2_postgres",
        "ha_local",
        "ha_ec2",
        "s3",
    ] {
        assert!(
            engines.contains(expected),
            "engine {expected} not found in {engines:?}"
        );
    }
    let mut crossings = Vec::new();
    for file in rust_files(&src) {
        let module = module_of(&src, &file);
        if module == ["providers"] {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for named in crossings_in(&module, &text, &engines) {
            let shown = file.strip_prefix(&src).unwrap().display();
            crossings.push(format!(
                "src/{shown}:{}: crate::{}",
                named.line,
                named.path.join("::")
            ));
        }
    }
    assert!(
        crossings.is_empty(),
        "engines named outside their own folder (move the shared part to a module of its own):\n{}",
        crossings.join("\n")
    );
}

#[test]
fn the_rule_sees_every_way_of_naming_an_engine() {
    let engines: BTreeSet<String> = ["ha_local", "s3", "ha_ec2"].map(String::from).into();
    let module = ["providers", "ha_ec2", "scaling"].map(String::from);
    let text = r#"
        use crate::providers::{ec2_common::vm, ha_local::{patroni::Patroni, tls}};
        use super::super::s3::errors;
        use super::members; // its own engine: fine
        // crate::providers::s3::x in a comment is not code
        fn f() { let _ = "crate::providers::s3::x"; crate::providers::ha_local::timings::FAST; }
    "#;
    let found: Vec<(usize, String)> = crossings_in(&module, text, &engines)
        .into_iter()
        .map(|n| (n.line, n.path.join("::")))
        .collect();
    assert_eq!(
        found,
        [
            (2, "providers::ha_local::patroni::Patroni".to_owned()),
            (2, "providers::ha_local::tls".to_owned()),
            (3, "providers::s3::errors".to_owned()),
            (6, "providers::ha_local::timings::FAST".to_owned()),
        ]
    );
}

/// Folders under `providers/` holding an `impl Provider for`.
fn engines(providers: &Path) -> BTreeSet<String> {
    std::fs::read_dir(providers)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|dir| dir.is_dir())
        .filter(|dir| {
            rust_files(dir).iter().any(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .contains("impl Provider for")
            })
        })
        .map(|dir| dir.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// `src/providers/ha_ec2/mod.rs` is `providers::ha_ec2`; `src/lib.rs` and `src/main.rs` are the root.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let mut parts: Vec<String> = file
        .strip_prefix(src)
        .unwrap()
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The engine paths `text` (a file of module `module`) names outside the engine's own folder.
fn crossings_in(module: &[String], text: &str, engines: &BTreeSet<String>) -> Vec<Named> {
    names_in(module, text)
        .into_iter()
        .filter(|named| match named.path.as_slice() {
            [first, engine, ..] if first == "providers" && engines.contains(engine) => {
                module.get(1) != Some(engine)
                    || module.first().map(String::as_str) != Some("providers")
            }
            _ => false,
        })
        .collect()
}

/// Every `crate::`, `super::`, `self::` and `berth_worker::` path in `text`, in `use` trees and in code.
fn names_in(module: &[String], text: &str) -> Vec<Named> {
    let code = without_comments_and_strings(text);
    let mut found = Vec::new();
    let mut rest = code.as_str();
    let mut offset = 0;
    while let Some(start) = next_path_start(rest) {
        let tail = &rest[start..];
        let line = code[..offset + start].matches('\n').count() + 1;
        let used = if is_use_statement(&code[..offset + start]) {
            let end = tail.find(';').unwrap_or(tail.len());
            for path in expand_use_tree(&tail[..end]) {
                if let Some(path) = resolve(module, &path) {
                    found.push(Named { line, path });
                }
            }
            end
        } else {
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            let segments: Vec<String> = tail[..end]
                .split("::")
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            if let Some(path) = resolve(module, &segments) {
                found.push(Named { line, path });
            }
            end
        };
        offset += start + used.max(1);
        rest = &code[offset..];
    }
    found
}

const ROOTS: [&str; 4] = ["crate::", "super::", "self::", "berth_worker::"];

fn next_path_start(text: &str) -> Option<usize> {
    ROOTS
        .iter()
        .filter_map(|root| {
            text.match_indices(root).map(|(i, _)| i).find(|&i| {
                i == 0
                    || !text[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
            })
        })
        .min()
}

/// Whether the path that starts where `before` ends is the head of a `use` (`pub use`, `pub(crate) use`).
fn is_use_statement(before: &str) -> bool {
    let trimmed = before.trim_end();
    trimmed.ends_with("use")
        && !trimmed[..trimmed.len() - 3].ends_with(|c: char| c.is_alphanumeric() || c == '_')
}

/// `a::{b, c::{d, e as f}}` -> `a::b`, `a::c::d`, `a::c::e`.
fn expand_use_tree(tree: &str) -> Vec<Vec<String>> {
    // Drop each `as name`, keeping the punctuation after it, then the white space.
    let mut kept = String::new();
    let mut words = tree.split_whitespace();
    while let Some(word) = words.next() {
        if word == "as" {
            let renamed = words.next().unwrap_or("");
            kept.extend(renamed.chars().filter(|c| matches!(c, ',' | '}' | '{')));
        } else {
            kept.push_str(word);
        }
    }
    let mut out = Vec::new();
    expand(&kept, &[], &mut out);
    out
}

fn expand(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    for item in split_top_level(tree) {
        let mut path = prefix.to_vec();
        match item.find('{') {
            Some(open) => {
                path.extend(split_segments(&item[..open]));
                let close = item.rfind('}').unwrap_or(item.len());
                expand(&item[open + 1..close], &path, out);
            }
            None => {
                path.extend(split_segments(&item));
                out.push(path);
            }
        }
    }
}

fn split_segments(text: &str) -> Vec<String> {
    text.split("::")
        .filter(|s| !s.is_empty() && *s != "*")
        .map(String::from)
        .collect()
}

fn split_top_level(text: &str) -> Vec<String> {
    let (mut items, mut depth, mut current) = (Vec::new(), 0, String::new());
    for c in text.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    items.push(current);
    items.into_iter().filter(|i| !i.is_empty()).collect()
}

/// A path as segments after `crate`, or `None` for paths into other crates.
fn resolve(module: &[String], path: &[String]) -> Option<Vec<String>> {
    let (mut base, mut rest): (Vec<String>, &[String]) = match path.first().map(String::as_str) {
        Some("crate" | "berth_worker") => (Vec::new(), &path[1..]),
        Some("self") => (module.to_vec(), &path[1..]),
        Some("super") => (module.to_vec(), path),
        _ => return None,
    };
    while rest.first().map(String::as_str) == Some("super") {
        base.pop();
        rest = &rest[1..];
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// The code with comments, string and char literals blanked (newlines kept, so line numbers hold).
fn without_comments_and_strings(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    // Skips to just past `end` (a char sequence), keeping the newlines passed over.
    let skip_past = |i: &mut usize, out: &mut String, end: &[char], escapes: bool| {
        while *i < chars.len() {
            if chars[*i..].starts_with(end) {
                *i += end.len();
                return;
            }
            if chars[*i] == '\n' {
                out.push('\n');
            }
            *i += if escapes && chars[*i] == '\\' { 2 } else { 1 };
        }
    };
    while i < chars.len() {
        let rest = &chars[i..];
        if rest.starts_with(&['/', '/']) {
            skip_past(&mut i, &mut out, &['\n'], false);
            out.push('\n');
        } else if rest.starts_with(&['/', '*']) {
            i += 2;
            skip_past(&mut i, &mut out, &['*', '/'], false);
        } else if rest[0] == '"' {
            i += 1;
            skip_past(&mut i, &mut out, &['"'], true);
            out.push_str("\"\"");
        } else if rest[0] == 'r' && raw_string_hashes(rest).is_some() {
            let hashes = raw_string_hashes(rest).unwrap();
            i += 2 + hashes;
            let mut end = vec!['"'];
            end.extend(std::iter::repeat_n('#', hashes));
            skip_past(&mut i, &mut out, &end, false);
            out.push_str("\"\"");
        } else if rest[0] == '\'' && (rest.get(2) == Some(&'\'') || rest.get(1) == Some(&'\\')) {
            // A char literal ('"', '\''); a lifetime ('a) has no closing quote here.
            i += 1;
            skip_past(&mut i, &mut out, &['\''], true);
            out.push_str("' '");
        } else {
            out.push(rest[0]);
            i += 1;
        }
    }
    out
}

/// `r"` is 0 hashes, `r#"` is 1, ...; `None` if `text` does not open a raw string.
fn raw_string_hashes(text: &[char]) -> Option<usize> {
    let hashes = text[1..].iter().take_while(|&&c| c == '#').count();
    (text.get(1 + hashes) == Some(&'"')).then_some(hashes)
}
