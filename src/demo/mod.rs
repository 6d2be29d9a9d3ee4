//! `tokend demo`: the daemon against an embedded provider on an ephemeral loopback port
//! (30 s access tokens, rotating refresh tokens; one refresh-token account, one
//! client-credentials account) with a temporary state dir, so tokend can be tried before
//! any real credentials exist.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::app::{self, Daemon, RunError};
use crate::clock::Clock;
use crate::config::{Config, DEFAULT_LISTEN, SystemEnvironment};
use crate::listen::{self, Limits};
use crate::provider::Provider;
use crate::store::{FileStore, StoreError};
use fake_provider::{ClientSpec, FakeProvider};

pub mod fake_provider;

/// Lifetime of the embedded provider's access tokens.
pub const DEMO_TOKEN_LIFETIME: Duration = Duration::from_secs(30);

/// The demo's config, around the embedded provider's address and a seed refresh token.
pub fn demo_config(provider: &str, listen: &str, state_dir: &Path, seed: &str) -> String {
    format!(
        r#"# The config `tokend demo` runs with. Real configs name secrets with {{ env = ".." }}
# or {{ file = ".." }}; the demo's are throwaway literals.
[server]
listen = ["{listen}"]

[state]
dir = "{state_dir}"

[refresh]
min_interval = "5s"

# A Zywave-style account: refresh_token grant, client secret in the form body,
# rotating refresh tokens, and a Profile header every API call must carry.
[accounts.demo-zywave]
grant = "refresh_token"
token_url = "{provider}/token"
client_id = "demo-client"
client_secret = "demo-client-secret"
client_auth = "client_secret_post"
request_format = "form"
scope = "offline_access demo:read"
refresh_token = "{seed}"
headers = {{ Profile = "B 1234" }}

# A client_credentials account; this endpoint sends expires_in as a string.
[accounts.demo-service]
grant = "client_credentials"
token_url = "{provider}/token"
client_id = "demo-service"
client_secret = "demo-service-secret"
scope = "demo.example.com"
"#,
        state_dir = state_dir.display()
    )
}

/// Runs the demo until Ctrl-C.
pub async fn run() -> Result<(), RunError> {
    let signals = app::signals()?;
    let clock = Clock::system();
    let fake = FakeProvider::new(DEMO_TOKEN_LIFETIME, clock.clone());
    fake.register(ClientSpec::zywave("demo-client", "demo-client-secret"));
    fake.register(ClientSpec::generic_client_credentials(
        "demo-service",
        "demo-service-secret",
    ));
    let seed = fake.grant_refresh_token("demo-client", Some("offline_access demo:read"));

    let provider_listener = listen::bind_tcp(loopback(0)).await?;
    let provider_addr = provider_listener
        .local_tcp_addr()
        .expect("a TCP listener has an address");

    // The usual port when it is free, so `tokend token` finds the demo without flags.
    let listener = match listen::bind_tcp(DEFAULT_LISTEN.parse().expect("literal address")).await {
        Ok(l) => l,
        Err(_) => listen::bind_tcp(loopback(0)).await?,
    };
    let listen = listener
        .local_tcp_addr()
        .expect("a TCP listener has an address");

    let state_dir = tempfile::Builder::new()
        .prefix("tokend-demo-")
        .tempdir()
        .map_err(|source| {
            RunError::Store(StoreError::Dir {
                dir: std::env::temp_dir(),
                source,
            })
        })?;
    let text = demo_config(
        &format!("http://{provider_addr}"),
        &listen.to_string(),
        state_dir.path(),
        &seed,
    );
    let config = Config::from_str_at(&text, Path::new("demo.toml"), &SystemEnvironment)?;
    let store = FileStore::open(state_dir.path())?;
    let provider = Provider::http(config.provider.connect_timeout)?;
    let daemon = Daemon::start(config, store as Arc<_>, provider, clock).await;
    // The provider runs on the daemon's tasks and stops with it. Its socket is already
    // listening: the first refreshes wait in its backlog until this starts accepting.
    daemon.serve(vec![provider_listener], fake.router(), Limits::default());
    daemon.serve(vec![listener], daemon.api(), Limits::default());

    println!("tokend demo: an embedded OAuth provider is running at http://{provider_addr}/token");
    println!(
        "  30 s access tokens, refresh tokens rotated on every use; state in {}",
        state_dir.path().display()
    );
    println!();
    println!("Fetch a token (JSON with expiry and the headers to send):");
    println!("  curl -s -H 'Tokend-Request: 1' http://{listen}/v1/token/demo-zywave");
    // The command as this process was started (target/release/tokend under cargo run).
    let me = std::env::args().next().unwrap_or_else(|| "tokend".into());
    println!("Just the access token, from a script:");
    println!("  {me} token demo-zywave --endpoint http://{listen}");
    println!("Call the demo API with it:");
    println!(
        "  curl -s -H \"Authorization: Bearer $(curl -s -H 'Tokend-Request: 1' http://{listen}/v1/token/demo-zywave/access_token)\" -H 'Profile: B 1234' http://{provider_addr}/api/whoami"
    );
    println!("Account states: curl -s http://{listen}/v1/accounts");
    println!();
    println!("Press Ctrl-C to stop.");

    let result = app::supervise(daemon, signals, None).await;
    drop(state_dir);
    result
}

fn loopback(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}
