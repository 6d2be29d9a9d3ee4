//! The baseline for the token-read benchmark: a minimal axum 0.8 server on the same
//! runtime `tokend` builds (`tokio::runtime::Builder::new_multi_thread().enable_all()`,
//! as in `src/cli/mod.rs`), with one route shaped like tokend's token route that answers a
//! fixed JSON body of about the same size as tokend's token answer.
//!
//! ```text
//! cargo run --release --example hello -- 127.0.0.1:0
//! cargo run --release --example hello -- 127.0.0.1:0 1000   # answer after 1000 µs
//! ```
//!
//! The optional delay stands for a real API's service time (the proxy benchmark's
//! upstream): a timer, not CPU, so the server's own cost per request stays the same.

use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

/// About the size of `GET /v1/token/{account}` from tokend with a fake-provider token.
const BODY: &str = r#"{"access_token":"at-12345-0123456789abcdef","account":"acct-00042","expires_at":"2030-01-01T00:00:00Z","expires_in":3599,"headers":{"Authorization":"Bearer at-12345-0123456789abcdef"},"scope":null,"token_type":"Bearer"}"#;

async fn token(Path(_account): Path<String>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], BODY)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".to_string());
    let delay = args
        .next()
        .map(|us| Duration::from_micros(us.parse().expect("the delay is a number of µs")));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
        // The harness reads the address from the first line.
        println!("listening={}", listener.local_addr().expect("address"));
        let app = match delay {
            None => Router::new().route("/v1/token/{account}", get(token)),
            Some(delay) => {
                let route = move |account: Path<String>| async move {
                    tokio::time::sleep(delay).await;
                    token(account).await
                };
                Router::new().route("/v1/token/{account}", get(route))
            }
        };
        axum::serve(listener, app).await.expect("serve");
    });
}
