//! The fake provider: in process on a manual clock from the fixed wall-clock start, with
//! every client the account blocks of `config` name; or served on 127.0.0.1 for the
//! real binary and the HTTP transport.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tokend::clock::Clock;
use tokend::demo::fake_provider::{ClientSpec, FakeProvider};
use tokio_util::sync::CancellationToken;

/// Wall-clock start of every test: fixed, so failures reproduce.
pub fn epoch() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// The provider with the three seed styles registered.
pub fn provider(clock: &Clock, lifetime: Duration) -> FakeProvider {
    let fake = FakeProvider::new(lifetime, clock.clone());
    fake.register(ClientSpec::zywave("zy-client", "zy-secret"));
    fake.register(ClientSpec::generic_client_credentials(
        "cc-client",
        "cc-secret",
    ));
    fake.register(ClientSpec::zephr("zephr-client", "zephr-secret"));
    fake
}

/// The wall clock, manual at `epoch()`, and `provider` on it issuing `lifetime` tokens:
/// where every paused-clock test starts.
pub fn manual_provider(lifetime: Duration) -> (Clock, FakeProvider) {
    let clock = Clock::manual(epoch());
    let fake = provider(&clock, lifetime);
    (clock, fake)
}

/// The fake provider's access-token lifetime in `start_provider`: long enough that no
/// refresh is due while a test runs, so every token request the provider sees is one the
/// test caused.
pub const LIFETIME: Duration = Duration::from_secs(3600);

/// Serves `fake` on 127.0.0.1 until the returned token is cancelled (or the test's runtime
/// ends); returns its address.
pub async fn serve_fake(fake: &FakeProvider) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake provider");
    let addr = listener.local_addr().expect("provider address");
    let stop = CancellationToken::new();
    let router = fake.router();
    let until = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(until.cancelled_owned())
            .await
            .expect("the fake provider serves");
    });
    (addr, stop)
}

/// The token endpoint of a fake provider served at `addr`.
pub fn token_url(addr: SocketAddr) -> String {
    format!("http://{addr}/token")
}

/// A fresh fake provider issuing `LIFETIME` tokens, served on 127.0.0.1; returns it and
/// its token endpoint URL.
pub async fn start_provider() -> (FakeProvider, String) {
    let fake = FakeProvider::new(LIFETIME, Clock::system());
    let (addr, _) = serve_fake(&fake).await;
    (fake, token_url(addr))
}

/// `start_provider` with a Zywave-style client `zy-client` and a client_credentials client
/// `svc-client` registered; returns the provider, its token URL and a live refresh token
/// for `zy-client`, for the accounts of `zy_and_svc`.
pub async fn start_provider_with_clients() -> (FakeProvider, String, String) {
    let (fake, url) = start_provider().await;
    fake.register(ClientSpec::zywave("zy-client", "zy-secret-literal"));
    fake.register(ClientSpec::generic_client_credentials(
        "svc-client",
        "svc-secret-literal",
    ));
    let seed = fake.grant_refresh_token("zy-client", Some("offline_access api:read"));
    (fake, url, seed)
}
