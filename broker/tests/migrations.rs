//! Upgrades: the broker's migrations run once however many processes start together (sqlx's advisory lock),
//! a database a newer release migrated still lets this release start, and migrations after the last release
//! keep the previous release's binaries working (a lint for destructive statements; docs/upgrading.md).

use std::path::{Path, PathBuf};

use sqlx::{
    PgPool,
    migrate::{MigrateError, Migrator},
    postgres::PgPoolOptions,
};

fn migrations_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations")
}

#[sqlx::test(migrations = false)]
async fn processes_starting_together_apply_each_migration_once(pool: PgPool) {
    assert!(
        broker::MIGRATOR.locking,
        "migrations take sqlx's advisory lock"
    );
    const PROCESSES: usize = 8;
    // A pool each, as separate berth-api and berth-worker processes have.
    let options = (*pool.connect_options()).clone();
    let runs: Vec<_> = (0..PROCESSES)
        .map(|_| {
            let options = options.clone();
            tokio::spawn(async move {
                let own = PgPoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await?;
                broker::MIGRATOR.run(&own).await?;
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for (i, run) in runs.into_iter().enumerate() {
        let result = run.await.unwrap();
        assert!(result.is_ok(), "migrator {i} failed: {result:?}");
    }

    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    let expected: Vec<(i64, bool)> = broker::MIGRATOR.iter().map(|m| (m.version, true)).collect();
    assert_eq!(
        applied, expected,
        "every migration applied once, successfully"
    );
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = 'service_instances'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 1);
}

#[sqlx::test(migrations = false)]
async fn a_database_a_newer_release_migrated_still_lets_this_release_start(pool: PgPool) {
    broker::MIGRATOR.run(&pool).await.unwrap();
    // What the next release's first process leaves behind: a migration this binary does not know.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99991231000000, 'from a newer release', true, '\\x00', 1)",
    )
    .execute(&pool)
    .await
    .unwrap();

    broker::MIGRATOR
        .run(&pool)
        .await
        .expect("an old binary restarting mid-upgrade starts");
    // Without ignore_missing sqlx refuses, which would stop a restarted old worker during a rolling upgrade.
    let strict = Migrator {
        migrations: broker::MIGRATOR.migrations.clone(),
        ..Migrator::DEFAULT
    };
    assert!(matches!(
        strict.run(&pool).await,
        Err(MigrateError::VersionMissing(99991231000000))
    ));
}

/// A comment on a statement, in the migration, that says a destructive statement was reviewed: what it breaks
/// for the previous release's binaries and why that is acceptable.
const ALLOW: &str = "-- migration-lint: allow";

/// The destructive statements in `sql` without an allow comment: what each does that old binaries may not
/// survive, and where.
fn destructive_statements(sql: &str) -> Vec<String> {
    split_statements(sql)
        .into_iter()
        .filter(|(raw, _)| !raw.contains(ALLOW))
        .flat_map(|(raw, code)| {
            let first_line = raw.trim().lines().next().unwrap_or("").to_string();
            findings(&code)
                .into_iter()
                .map(move |what| format!("{what}: {first_line}"))
        })
        .collect()
}

/// What in one statement (comments and literals already blanked, upper case, spaces collapsed) breaks old
/// binaries: removing or renaming what they read or write, changing a type, or refusing rows they insert.
fn findings(code: &str) -> Vec<&'static str> {
    let words: Vec<&str> = code.split(' ').filter(|w| !w.is_empty()).collect();
    let mut found = Vec::new();
    for (i, word) in words.iter().enumerate() {
        let next = words.get(i + 1).copied().unwrap_or("");
        let before = if i > 0 { words[i - 1] } else { "" };
        match *word {
            "DROP" if !matches!(next, "NOT" | "CONSTRAINT" | "INDEX") => {
                found.push("DROP (of a table, column, type, default, function or trigger)")
            }
            "RENAME" => found.push("RENAME"),
            "TRUNCATE" => found.push("TRUNCATE"),
            // ALTER [COLUMN] c [SET DATA] TYPE t, not ALTER TYPE (an enum) nor CREATE TYPE.
            "TYPE"
                if before == "DATA"
                    || (i >= 2 && words[i - 2] == "ALTER")
                    || (i >= 3 && words[i - 3] == "ALTER" && words[i - 2] == "COLUMN") =>
            {
                found.push("ALTER COLUMN ... TYPE")
            }
            "SET" if next == "NOT" && words.get(i + 2) == Some(&"NULL") => {
                found.push("SET NOT NULL")
            }
            "ADD" if next == "CONSTRAINT" => found.push("ADD CONSTRAINT"),
            "ADD" => {
                let clause_end = words[i + 1..]
                    .iter()
                    .position(|w| *w == "ADD" || *w == ",")
                    .map_or(words.len(), |p| i + 1 + p);
                let clause = &words[i + 1..clause_end];
                let not_null = clause
                    .windows(2)
                    .enumerate()
                    .any(|(j, w)| w == ["NOT", "NULL"] && (j == 0 || clause[j - 1] != "IS"));
                if not_null && !clause.contains(&"DEFAULT") {
                    found.push("ADD COLUMN ... NOT NULL without DEFAULT")
                }
            }
            _ => {}
        }
    }
    found
}

/// Splits SQL into statements at `;` outside strings, quoted names, comments and dollar-quoted bodies:
/// `(raw text with comments, code)` where code has comments and literals blanked, in upper case.
fn split_statements(sql: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = sql.chars().collect();
    let (mut raw, mut code) = (String::new(), String::new());
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
        let skip_to = |end: &str, from: usize| -> usize {
            let text: String = chars[from..].iter().collect();
            text.find(end).map_or(chars.len(), |p| {
                from + text[..p].chars().count() + end.chars().count()
            })
        };
        let end = if rest == "--" {
            skip_to("\n", i)
        } else if rest == "/*" {
            skip_to("*/", i + 2)
        } else if c == '\'' || c == '"' {
            skip_to(&c.to_string(), i + 1)
        } else if c == '$' {
            let tag_len = chars[i + 1..].iter().position(|ch| *ch == '$').filter(|p| {
                chars[i + 1..i + 1 + p]
                    .iter()
                    .all(|ch| ch.is_alphanumeric() || *ch == '_')
            });
            match tag_len {
                Some(p) => {
                    let tag: String = chars[i..i + p + 2].iter().collect();
                    skip_to(&tag, i + p + 2)
                }
                None => i + 1,
            }
        } else {
            i + 1
        };
        let piece: String = chars[i..end].iter().collect();
        raw.push_str(&piece);
        if end == i + 1 {
            if c == ';' {
                out.push((
                    std::mem::take(&mut raw),
                    normalize(&std::mem::take(&mut code)),
                ));
            } else {
                code.push(c);
            }
        } else {
            code.push(' ');
        }
        i = end;
    }
    if !code.trim().is_empty() {
        out.push((raw, normalize(&code)));
    }
    out
}

fn normalize(code: &str) -> String {
    code.split_whitespace()
        .map(str::to_uppercase)
        .collect::<Vec<_>>()
        .join(" ")
        .replace(',', " , ")
        .replace('(', " ( ")
        .replace(')', " ) ")
}

/// The migration files after `migrations/RELEASED` (the newest migration of the last release).
fn unreleased_migrations() -> Vec<PathBuf> {
    let dir = migrations_dir();
    let released_text = std::fs::read_to_string(dir.join("RELEASED")).expect("migrations/RELEASED");
    let released = released_text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .expect("RELEASED names a migration")
        .to_string();
    assert!(
        dir.join(&released).is_file(),
        "migrations/RELEASED names {released}, which is not a file there"
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .filter(|p| p.file_name().unwrap().to_str().unwrap() > released.as_str())
        .collect();
    files.sort();
    files
}

#[test]
fn migrations_after_the_last_release_keep_old_binaries_working() {
    let mut problems = Vec::new();
    for file in unreleased_migrations() {
        let sql = std::fs::read_to_string(&file).unwrap();
        for finding in destructive_statements(&sql) {
            problems.push(format!("{}: {finding}", file.display()));
        }
    }
    assert!(
        problems.is_empty(),
        "destructive statements in unreleased migrations (expand now, contract a release later; or mark a \
         reviewed one with `{ALLOW} <why>`; docs/upgrading.md):\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_lint_finds_destructive_statements_and_honours_the_allow_comment() {
    let flagged = |sql: &str| destructive_statements(sql);
    for sql in [
        "ALTER TABLE tasks DROP COLUMN progress;",
        "alter table tasks drop progress;",
        "DROP TABLE presets;",
        "ALTER TABLE tasks RENAME COLUMN progress TO note;",
        "ALTER TABLE tasks RENAME TO jobs;",
        "ALTER TABLE tasks ALTER COLUMN attempts TYPE bigint;",
        "ALTER TABLE tasks ALTER attempts SET DATA TYPE bigint;",
        "ALTER TABLE tasks ALTER COLUMN worker_id SET NOT NULL;",
        "ALTER TABLE tasks ALTER COLUMN state DROP DEFAULT;",
        "ALTER TABLE tasks ADD COLUMN owner text NOT NULL;",
        "ALTER TABLE tasks ADD COLUMN a text, ADD COLUMN owner text NOT NULL;",
        "ALTER TABLE tasks ADD CONSTRAINT positive CHECK (attempts >= 0);",
        "TRUNCATE tasks;",
    ] {
        assert_eq!(flagged(sql).len(), 1, "{sql}: {:?}", flagged(sql));
    }
    for sql in [
        "CREATE TABLE t (id bigint NOT NULL, note text NOT NULL DEFAULT '');",
        "ALTER TABLE tasks ADD COLUMN note text;",
        "ALTER TABLE tasks ADD COLUMN note text NOT NULL DEFAULT '';",
        "ALTER TABLE tasks ALTER COLUMN worker_id DROP NOT NULL;",
        "ALTER TABLE tasks DROP CONSTRAINT tasks_state_check;",
        "DROP INDEX tasks_due;",
        "CREATE INDEX t_x ON t (x) WHERE x IS NOT NULL;",
        "ALTER TYPE state ADD VALUE 'paused';",
        "COMMENT ON TABLE t IS 'we never DROP TABLE here; nor RENAME';",
        "-- DROP TABLE tasks; was considered\nSELECT 1;",
        "CREATE FUNCTION f() RETURNS trigger AS $$ BEGIN DROP TABLE x; RETURN NEW; END $$ LANGUAGE plpgsql;",
        "-- migration-lint: allow the column has been unused since 0.2.0\nALTER TABLE tasks DROP COLUMN progress;",
    ] {
        assert!(flagged(sql).is_empty(), "{sql}: {:?}", flagged(sql));
    }
    // The allow comment covers its own statement only.
    let two = "-- migration-lint: allow reviewed\nALTER TABLE a DROP COLUMN b;\nALTER TABLE c DROP COLUMN d;";
    assert_eq!(flagged(two).len(), 1, "{:?}", flagged(two));
}

#[test]
fn the_released_migrations_pass_the_lint_too() {
    // Not required of released migrations, but true today: a baseline that shows the lint reads real files
    // without false alarms.
    for entry in std::fs::read_dir(migrations_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "sql") {
            let findings = destructive_statements(&std::fs::read_to_string(&path).unwrap());
            assert!(findings.is_empty(), "{}: {findings:?}", path.display());
        }
    }
}
