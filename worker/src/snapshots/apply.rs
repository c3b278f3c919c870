//! Putting a snapshot into an instance's database: a backup is restored into a scratch database and swapped
//! in; a preset is restored once per server into a template database, and every instance after that gets a
//! `CREATE DATABASE ... TEMPLATE` clone (seconds, however big the preset) swapped in the same way.

use std::time::Duration;

use broker::{
    db::snapshots::SnapshotRow,
    names::{quote_ident, quote_literal},
};
use sqlx::PgConnection;

use super::{
    pipeline::Snapshots,
    target::{
        self, DatabaseTarget, ScratchNames, ServerLogin, create_incoming, preset_role, swap_in,
        template_names,
    },
};
use crate::{
    providers::{
        Progress,
        postgres::{database_exists, ensure_role, exec},
    },
    registry::TaskError,
};

/// Replaces the target's database with `snapshot`, restored directly (backups).
pub async fn restore_into(
    snapshots: &Snapshots,
    prefix: &str,
    target: &DatabaseTarget,
    snapshot: &SnapshotRow,
) -> Result<(), TaskError> {
    let mut admin = target
        .login
        .connect("postgres", "connecting to the instance's server")
        .await?;
    undo_half_swap(&mut admin, prefix, &target.database).await?;
    let scratch = ScratchNames::of(prefix, &target.database);
    create_incoming(&mut admin, target, &scratch.incoming).await?;
    if let Err(e) = snapshots
        .restore(snapshot, &target.login, &scratch.incoming, &target.owner)
        .await
    {
        target::drop_scratch(&mut admin, prefix, &target.database).await?;
        return Err(e);
    }
    swap_in(&mut admin, prefix, target).await
}

/// Replaces the target's database with a clone of the preset version's template, building the template on
/// this server first if it is not there. Waits while another worker builds it.
pub async fn select_preset(
    snapshots: &Snapshots,
    prefix: &str,
    target: &DatabaseTarget,
    snapshot: &SnapshotRow,
    post_restore_sql: Option<&str>,
) -> Result<Progress<()>, TaskError> {
    let mut admin = target
        .login
        .connect("postgres", "connecting to the instance's server")
        .await?;
    undo_half_swap(&mut admin, prefix, &target.database).await?;
    let (template, _) = template_names(prefix, snapshot.id);
    if !database_exists(&mut admin, &template).await? {
        let built = build_template(
            &mut admin,
            snapshots,
            prefix,
            &target.login,
            snapshot,
            post_restore_sql,
        )
        .await?;
        if let Progress::Wait { after, progress } = built {
            return Ok(Progress::Wait { after, progress });
        }
    }
    let scratch = ScratchNames::of(prefix, &target.database);
    let incoming = quote_ident(&scratch.incoming);
    exec(
        &mut admin,
        &format!("DROP DATABASE IF EXISTS {incoming} WITH (FORCE)"),
        "dropping a scratch database",
    )
    .await?;
    // FILE_COPY copies the files and skips WAL-logging every block: the fast way for a large template.
    let strategy = if server_version(&mut admin).await? >= 150000 {
        " STRATEGY = FILE_COPY"
    } else {
        ""
    };
    exec(
        &mut admin,
        &format!(
            "CREATE DATABASE {incoming} TEMPLATE {} OWNER {}{strategy}",
            quote_ident(&template),
            quote_ident(&target.owner)
        ),
        "cloning the preset's template",
    )
    .await?;
    let mut clone = target
        .login
        .connect(&scratch.incoming, "connecting to the cloned database")
        .await?;
    let role = quote_ident(&preset_role(prefix));
    exec(
        &mut clone,
        &format!(
            "REASSIGN OWNED BY {role} TO {}; DROP OWNED BY {role};",
            quote_ident(&target.owner)
        ),
        "handing the preset's objects to the instance's owner",
    )
    .await?;
    drop(clone);
    swap_in(&mut admin, prefix, target).await?;
    Ok(Progress::Done(()))
}

async fn build_template(
    admin: &mut PgConnection,
    snapshots: &Snapshots,
    prefix: &str,
    login: &ServerLogin,
    snapshot: &SnapshotRow,
    post_restore_sql: Option<&str>,
) -> Result<Progress<()>, TaskError> {
    let (template, building) = template_names(prefix, snapshot.id);
    // One builder per template and server; the lock goes with the session if this worker dies.
    let lock = format!(
        "SELECT pg_try_advisory_lock(hashtext({}))",
        quote_literal(&template)
    );
    let locked: bool = sqlx::query_scalar(&lock)
        .fetch_one(&mut *admin)
        .await
        .map_err(|e| crate::providers::postgres::classify(e, "locking the preset template"))?;
    if !locked {
        return Ok(Progress::Wait {
            after: Duration::from_secs(2),
            progress: "waiting for another worker to cache the preset on this server".into(),
        });
    }
    let result = build_locked(
        admin,
        snapshots,
        prefix,
        login,
        snapshot,
        post_restore_sql,
        &template,
        &building,
    )
    .await;
    let unlock = format!(
        "SELECT pg_advisory_unlock(hashtext({}))",
        quote_literal(&template)
    );
    let _ = exec(admin, &unlock, "unlocking the preset template").await;
    result.map(Progress::Done)
}

#[allow(clippy::too_many_arguments)]
async fn build_locked(
    admin: &mut PgConnection,
    snapshots: &Snapshots,
    prefix: &str,
    login: &ServerLogin,
    snapshot: &SnapshotRow,
    post_restore_sql: Option<&str>,
    template: &str,
    building: &str,
) -> Result<(), TaskError> {
    if database_exists(admin, template).await? {
        return Ok(());
    }
    let role = preset_role(prefix);
    ensure_role(admin, &role, "NOLOGIN", "creating the preset owner role").await?;
    let (building_q, role_q) = (quote_ident(building), quote_ident(&role));
    exec(
        admin,
        &format!("DROP DATABASE IF EXISTS {building_q} WITH (FORCE)"),
        "dropping a half-built template",
    )
    .await?;
    exec(
        admin,
        &format!("CREATE DATABASE {building_q} TEMPLATE template0"),
        "creating the preset's template",
    )
    .await?;
    exec(
        admin,
        &format!("REVOKE ALL ON DATABASE {building_q} FROM PUBLIC; GRANT CONNECT, CREATE ON DATABASE {building_q} TO {role_q};"),
        "opening the template to the preset role",
    )
    .await?;
    let mut db = login
        .connect(building, "connecting to the preset's template")
        .await?;
    exec(
        &mut db,
        &format!("GRANT CREATE ON SCHEMA public TO {role_q}"),
        "opening the public schema to the preset role",
    )
    .await?;
    drop(db);
    let restored = async {
        snapshots.restore(snapshot, login, building, &role).await?;
        if let Some(sql) = post_restore_sql.filter(|s| !s.trim().is_empty()) {
            let mut db = login
                .connect(building, "connecting to the preset's template")
                .await?;
            exec(
                &mut db,
                &format!("SET ROLE {role_q}"),
                "acting as the preset role",
            )
            .await?;
            exec(&mut db, sql, "running the preset's post_restore_sql").await?;
        }
        Ok::<_, TaskError>(())
    }
    .await;
    if let Err(e) = restored {
        let _ = exec(
            admin,
            &format!("DROP DATABASE IF EXISTS {building_q} WITH (FORCE)"),
            "dropping a failed template",
        )
        .await;
        return Err(e);
    }
    exec(
        admin,
        &format!(
            "ALTER DATABASE {building_q} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false; \
             ALTER DATABASE {building_q} RENAME TO {}",
            quote_ident(template)
        ),
        "publishing the preset's template",
    )
    .await
}

/// A swap cut short leaves the instance's database renamed away and no database under its name: put it back
/// before anything else touches the scratch databases.
async fn undo_half_swap(
    admin: &mut PgConnection,
    prefix: &str,
    database: &str,
) -> Result<(), TaskError> {
    let scratch = ScratchNames::of(prefix, database);
    if !database_exists(admin, database).await? && database_exists(admin, &scratch.outgoing).await?
    {
        let db = quote_ident(database);
        exec(
            admin,
            &format!(
                "ALTER DATABASE {} RENAME TO {db}; ALTER DATABASE {db} WITH ALLOW_CONNECTIONS true",
                quote_ident(&scratch.outgoing)
            ),
            "putting back a database a cut-short swap had renamed",
        )
        .await?;
    }
    Ok(())
}

async fn server_version(admin: &mut PgConnection) -> Result<i32, TaskError> {
    let v: String = sqlx::query_scalar("SHOW server_version_num")
        .fetch_one(&mut *admin)
        .await
        .map_err(|e| crate::providers::postgres::classify(e, "reading the server version"))?;
    Ok(v.parse().unwrap_or(0))
}
