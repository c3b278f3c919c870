//! Password guessing against the real binary: the source is the TCP peer, so guesses from 127.0.0.2 lead to 429
//! for that address while the platform on 127.0.0.1 keeps being served.

use std::{net::IpAddr, time::Duration};

use berth_tests::Stack;

#[tokio::test]
async fn guesses_from_one_address_do_not_lock_out_another() {
    let stack = Stack::start_with(vec![
        ("AUTH_FAILURE_LIMIT", "3".into()),
        ("AUTH_FAILURE_WINDOW_SECS", "60".into()),
    ])
    .await
    .expect("stack");
    let guesser = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let catalog = |client: &reqwest::Client, password: &str| {
        client
            .get(format!("{}/v2/catalog", stack.base_url))
            .basic_auth(&stack.username, Some(password))
            .header("X-Broker-API-Version", "2.17")
            .send()
    };
    for _ in 0..3 {
        assert_eq!(
            catalog(&guesser, "guess").await.unwrap().status().as_u16(),
            401
        );
    }
    let refused = catalog(&guesser, &stack.password).await.unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(
        catalog(&stack.http, &stack.password)
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    stack.stop().await;
}
