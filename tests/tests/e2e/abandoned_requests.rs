//! Abandoned requests are never written: provisions sent while the broker's database is down, whose clients
//! walk away (a short client timeout), leave nothing behind when the database comes back. Otherwise the
//! platform's cleanup DELETE gets 410 and the instance is orphaned for good.

use std::time::{Duration, Instant};

use berth_tests::{OsbClient, PG_SERVICE, PG_SHARED, TestFolder, bin_dir, free_port, repo_dir};
use broker::embedded::PgServer;
use reqwest::Method;
use secrecy::ExposeSecret;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tokio::process::Command;

fn provision_body() -> serde_json::Value {
    json!({"service_id": PG_SERVICE, "plan_id": PG_SHARED, "organization_guid": "o", "space_guid": "s"})
}

async fn rows(url: &str) -> (i64, i64) {
    let mut conn = PgConnection::connect(url)
        .await
        .expect("the broker database is back");
    sqlx::query_as("SELECT (SELECT count(*) FROM service_instances), (SELECT count(*) FROM tasks)")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn provisions_abandoned_while_the_database_is_down_are_never_written() {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let dir = std::env::temp_dir().join(format!("berth-e2e-abandoned-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let folder = TestFolder(dir.clone());
    // The broker's own Postgres, which this test stops and starts.
    let pg = PgServer::ensure_started(&dir.join("pg"))
        .await
        .expect("a private Postgres");
    pg.ensure_database("broker").await.unwrap();
    let broker_url = pg.url("broker").expose_secret().to_string();

    let key = dir.join("master.key");
    broker::crypto::generate_key_file(&key).unwrap();
    let port = free_port().unwrap();
    let password = broker::crypto::random_password(24);
    let log = std::fs::File::create(dir.join("api.log")).unwrap();
    let mut api = Command::new(bin_dir().join("berth-api"))
        .env("DATABASE_URL", &broker_url)
        .env("SHARED_POSTGRES_URL", pg.url("postgres").expose_secret())
        .env("BERTH_KEY_FILE", &key)
        .env("PLANS_DIR", repo_dir().join("plans"))
        .env("BROKER_USERNAME", "e2e")
        .env("BROKER_PASSWORD", &password)
        .env("PORT", port.to_string())
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("starting berth-api");
    let client =
        OsbClient::new(format!("http://127.0.0.1:{port}"), "e2e".into(), password).unwrap();
    client.wait_healthy(Duration::from_secs(60)).await.unwrap();
    let first = client
        .send(
            client
                .request(
                    Method::PUT,
                    "/v2/service_instances/before?accepts_incomplete=true",
                )
                .json(&provision_body()),
        )
        .await
        .unwrap();
    assert_eq!(first.0, 202, "{first:?}");
    assert_eq!(rows(&broker_url).await, (1, 1));

    pg.stop().await.expect("stopping the broker's Postgres");
    // Clients that give up after a second, in waves over a few seconds, so some wait on a connection the
    // broker is still trying to open when the database comes back.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut abandoned = Vec::new();
    let mut sends = Vec::new();
    for wave in 0..4 {
        for i in 0..5 {
            let id = format!("abandoned-{wave}-{i}");
            let req = impatient
                .put(format!(
                    "{}/v2/service_instances/{id}?accepts_incomplete=true",
                    client.base_url
                ))
                .basic_auth(&client.username, Some(&client.password))
                .header("X-Broker-API-Version", "2.17")
                .json(&provision_body());
            sends.push(tokio::spawn(async move {
                req.send().await.map(|r| r.status().as_u16())
            }));
            abandoned.push(id);
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    for send in sends {
        // A timeout (the client walked away) or a refusal; never an acceptance.
        match send.await.unwrap() {
            Ok(status) => assert!(
                status >= 500,
                "a provision was answered {status} while the database was down"
            ),
            Err(e) => assert!(e.is_timeout(), "{e}"),
        }
    }
    pg.start()
        .await
        .expect("starting the broker's Postgres again");

    // The broker works again: a patient client's provision is accepted.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = client
            .send(
                client
                    .request(
                        Method::PUT,
                        "/v2/service_instances/after?accepts_incomplete=true",
                    )
                    .json(&provision_body()),
            )
            .await
            .unwrap();
        if status == 202 {
            break;
        }
        assert!(
            status == 503 && Instant::now() < deadline,
            "after the restart: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Longer than the pool's acquire timeout (10 s): a request still queued in the broker would be written by now.
    let watch_until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < watch_until {
        assert_eq!(
            rows(&broker_url).await,
            (2, 2),
            "an abandoned provision was written after its client left"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And the platform's cleanup of an abandoned one agrees: there is nothing.
    for id in abandoned.iter().take(3) {
        let uri = format!(
            "/v2/service_instances/{id}?service_id={PG_SERVICE}&plan_id={PG_SHARED}&accepts_incomplete=true"
        );
        let (status, _) = client
            .send(client.request(Method::DELETE, &uri))
            .await
            .unwrap();
        assert_eq!(status, 410, "{id}");
    }

    let _ = api.start_kill();
    let _ = api.wait().await;
    let _ = pg.stop().await;
    drop(folder);
}
