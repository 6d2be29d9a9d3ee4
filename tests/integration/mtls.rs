//! Mutual TLS client authentication (RFC 8705) over real HTTPS on 127.0.0.1: the fake
//! provider behind a TLS server that asks for client certificates, a private CA made in
//! the test. The daemon keeps refreshing with its certificate (`tls_client_auth`, and a
//! secret-authenticated client whose tokens are bound to it); revocation presents it too;
//! without it, or with another one, the provider's refusal is classified and permanent;
//! `self_signed_tls_client_auth` works with a self-signed certificate; the proxy presents
//! the identity to the account's API, so certificate-bound tokens work through it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokend::clock::Clock;
use tokend::config::{AccountConfig, AccountName, Config};
use tokend::demo::fake_provider::{ClientSpec, FakeProvider};
use tokend::provider::{ErrorClass, Provider, ProviderError, TokenGrant};
use tokend::secret::Secret;

use crate::support::tls::{ClientCerts, Issued, Pki, self_signed, serve_fake_tls};
use crate::support::{Harness, parse_config};

const S: fn(u64) -> Duration = Duration::from_secs;

/// Writes `text` to `dir/name`, private (0600) as a key file should be.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The keys that point an account at the HTTPS provider at `base` with `cert` as its TLS
/// identity (none if `None`), trusting `ca`.
fn tls_keys(dir: &Path, base: &str, ca: &Path, cert: Option<(&str, &Issued)>) -> String {
    let mut keys = format!(
        "token_url = \"{base}/token\"\nrevocation_endpoint = \"{base}/revoke\"\nca_file = \"{}\"\n",
        ca.display()
    );
    if let Some((name, cert)) = cert {
        let c = write(dir, &format!("{name}.pem"), &cert.cert_pem);
        let k = write(dir, &format!("{name}.key"), &cert.key_pem);
        keys.push_str(&format!(
            "client_certificate = \"{}\"\nclient_key = {{ file = \"{}\" }}\n",
            c.display(),
            k.display()
        ));
    }
    keys
}

fn account(config: &Config, name: &str) -> AccountConfig {
    (*config.accounts[&AccountName::parse(name).unwrap()]).clone()
}

/// A provider client over real HTTPS.
fn https() -> Provider {
    Provider::http(S(5)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_auth_keeps_refreshing_over_https_and_revocation_presents_the_certificate() {
    let pki = Pki::new("bank test CA");
    let client = pki.client("tokend-bank");
    // 4 s tokens refreshed after a quarter of their life: several refreshes on the real
    // clock within a few seconds, with 3 s to spare on a loaded machine.
    let fake = FakeProvider::new(S(4), Clock::system());
    fake.register(ClientSpec::tls("bank-client", client.der.clone()));
    fake.register(ClientSpec {
        tls_certificate: Some(client.der.clone()),
        ..ClientSpec::generic_client_credentials("bound-client", "bound-secret")
    });
    let seed = fake.grant_refresh_token("bank-client", Some("accounts"));
    let (addr, _stop) = serve_fake_tls(&fake, &pki.server(), ClientCerts::FromCa(&pki)).await;
    let base = format!("https://localhost:{}", addr.port());
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "bank-ca.pem", &pki.ca_pem());
    let keys = tls_keys(dir.path(), &base, &ca, Some(("client", &client)));
    let config = parse_config(&format!(
        "[state]\ndir = \"{}\"\n\n[refresh]\nratio = 0.25\nmin_interval = \"0s\"\nmargin = \"0s\"\n\
         \n[accounts.bank]\ngrant = \"refresh_token\"\nclient_id = \"bank-client\"\nclient_auth = \"tls_client_auth\"\nrefresh_token = \"{seed}\"\n{keys}\
         \n[accounts.bound]\ngrant = \"client_credentials\"\nclient_id = \"bound-client\"\nclient_secret = \"bound-secret\"\n{keys}\
         \n[accounts.bound.proxy]\nupstream = \"{base}/api\"\n",
        dir.path().display()
    ));
    let bank = account(&config, "bank");
    let mut h = Harness::builder(fake, Clock::system(), dir)
        .provider(https())
        .start(config)
        .await;

    // Bounded: each account refreshes about every second.
    let deadline = Instant::now() + S(30);
    while h.fake.counts().refresh_grants < 4 || h.fake.counts().client_credentials_grants < 4 {
        assert!(Instant::now() < deadline, "{:?}", h.fake.counts());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counts = h.fake.counts();
    assert_eq!(counts.rejected, 0, "{counts:?}");
    assert_eq!(
        counts.client_certificates, counts.token_requests,
        "every token request came with the certificate: {counts:?}"
    );
    for name in ["bank", "bound"] {
        assert_eq!(h.account_state(name).await["state"], "ok", "{name}");
        let (status, _) = h.get(&format!("/v1/token/{name}")).await;
        assert_eq!(status, 200, "{name}");
    }

    // The proxy presents the identity to the account's API too, so a certificate-bound
    // token (RFC 8705 §3) works through it; the same token without the certificate does not.
    let (status, answer) = h.get("/proxy/bound/whoami").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["certificate_bound"], true, "{answer}");
    let token = h.token("bound").await;
    let without_identity = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let direct = without_identity
        .get(format!("{base}/api/whoami"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 401, "a bound token alone is refused");

    // `tokend logout` revokes through the same transport, so with the same identity.
    // The daemon stops first: its refreshes would present the certificate meanwhile.
    h.shutdown().await;
    let before = h.fake.counts().client_certificates;
    let spare = h.fake.grant_refresh_token("bank-client", None);
    https()
        .revoke(&bank, &Secret::new(spare.clone()))
        .await
        .unwrap();
    assert!(h.fake.revoked().contains(&spare));
    assert_eq!(h.fake.counts().client_certificates, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_registered_certificate_the_refusal_is_permanent_and_says_why() {
    let pki = Pki::new("bank test CA");
    let (registered, other) = (pki.client("tokend-bank"), pki.client("someone-else"));
    let fake = FakeProvider::new(S(60), Clock::system());
    fake.register(ClientSpec::tls("bank-client", registered.der.clone()));
    let server = pki.server();
    let (lenient, _s1) = serve_fake_tls(&fake, &server, ClientCerts::FromCa(&pki)).await;
    let (strict, _s2) = serve_fake_tls(&fake, &server, ClientCerts::RequiredFromCa(&pki)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "bank-ca.pem", &pki.ca_pem());
    let lenient = format!("https://localhost:{}", lenient.port());
    let strict = format!("https://localhost:{}", strict.port());
    let config = parse_config(&format!(
        "[accounts.none]\ngrant = \"client_credentials\"\nclient_id = \"bank-client\"\nclient_secret = \"guess\"\n{}\
         \n[accounts.other]\ngrant = \"client_credentials\"\nclient_id = \"bank-client\"\nclient_auth = \"tls_client_auth\"\n{}\
         \n[accounts.strict]\ngrant = \"client_credentials\"\nclient_id = \"bank-client\"\nclient_secret = \"guess\"\n{}",
        tls_keys(dir.path(), &lenient, &ca, None),
        tls_keys(dir.path(), &lenient, &ca, Some(("other", &other))),
        tls_keys(dir.path(), &strict, &ca, None),
    ));
    let request = |name: &str| {
        let a = account(&config, name);
        async move {
            https()
                .request_token(&a, TokenGrant::ClientCredentials)
                .await
                .unwrap_err()
        }
    };
    for (name, why) in [
        ("none", "no client certificate in the TLS handshake"),
        (
            "other",
            "not the client certificate registered for this client",
        ),
    ] {
        let err = request(name).await;
        assert_eq!(err.oauth_error(), Some("invalid_client"), "{name}: {err}");
        assert_eq!(err.class(), ErrorClass::Permanent, "{name}: {err}");
        assert!(err.to_string().contains(why), "{name}: {err}");
    }
    let err = request("strict").await;
    assert!(
        matches!(err, ProviderError::ClientCertificate(_)),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Permanent, "{err}");
    let text = err.to_string();
    assert!(text.contains("TLS handshake with localhost"), "{text}");
    assert!(text.contains("client certificate"), "{text}");
    assert!(text.contains("client_certificate and client_key"), "{text}");
    assert_eq!(fake.counts().client_certificates, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_tls_client_auth_is_known_by_its_certificate() {
    let pki = Pki::new("provider test CA");
    let (mine, impostor) = (self_signed("tokend-self"), self_signed("tokend-self"));
    let fake = FakeProvider::new(S(60), Clock::system());
    fake.register(ClientSpec::tls("self-client", mine.der.clone()));
    let (addr, _stop) = serve_fake_tls(&fake, &pki.server(), ClientCerts::Any).await;
    let base = format!("https://localhost:{}", addr.port());
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "provider-ca.pem", &pki.ca_pem());
    let block = |name: &str, cert: &Issued| {
        format!(
            "[accounts.{name}]\ngrant = \"client_credentials\"\nclient_id = \"self-client\"\nclient_auth = \"self_signed_tls_client_auth\"\n{}\n",
            tls_keys(dir.path(), &base, &ca, Some((name, cert)))
        )
    };
    let config = parse_config(&(block("mine", &mine) + &block("impostor", &impostor)));
    let token = https()
        .request_token(&account(&config, "mine"), TokenGrant::ClientCredentials)
        .await
        .unwrap();
    assert!(!token.access_token.expose().is_empty());
    let err = https()
        .request_token(&account(&config, "impostor"), TokenGrant::ClientCredentials)
        .await
        .unwrap_err();
    assert_eq!(err.oauth_error(), Some("invalid_client"), "{err}");
    assert_eq!(fake.counts().client_certificates, 1);
}

/// `tokend check` names the method, the certificate (subject, expiry, fingerprint, file)
/// and where the key comes from, never the key; for certificate-bound tokens with a
/// secret it shows both.
#[tokio::test]
async fn check_shows_the_certificate_and_never_the_key() {
    use crate::support::{Setup, expect_code, run_cmd, tokend};
    let pki = Pki::new("bank test CA");
    let client = pki.client("tokend-bank");
    let setup = Setup::new();
    let dir = setup.dir.path();
    let ca = write(dir, "bank-ca.pem", &pki.ca_pem());
    let keys = tls_keys(
        dir,
        "https://auth.bank.example",
        &ca,
        Some(("client", &client)),
    );
    setup.write_config(&[format!(
        "\n[accounts.bank]\ngrant = \"client_credentials\"\nclient_id = \"bank-client\"\nclient_auth = \"tls_client_auth\"\n{keys}\
         \n[accounts.bound]\ngrant = \"client_credentials\"\nclient_id = \"bound-client\"\nclient_secret = \"s3cr3t-literal\"\n{keys}"
    )]);
    let mut cmd = tokend();
    cmd.args(["check", "--config"]).arg(setup.config_path());
    let done = expect_code(&run_cmd(&mut cmd, S(20)).await, 0);
    let clients: Vec<&str> = done
        .stdout
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("client:"))
        .map(str::trim)
        .collect();
    let certificate = format!(
        "certificate CN=tokend-bank from {}, expires ",
        dir.join("client.pem").display()
    );
    let key = format!("key from file {}", dir.join("client.key").display());
    assert!(
        clients[0].starts_with(&format!("bank-client (tls_client_auth, {certificate}")),
        "{}",
        done.stdout
    );
    assert!(clients[0].ends_with(&format!("{key})")), "{}", done.stdout);
    assert!(
        clients[1].starts_with("bound-client (client_secret_post, secret from the config file; and certificate CN=tokend-bank"),
        "{}",
        done.stdout
    );
    let body = client.key_pem.lines().nth(1).unwrap();
    assert!(!done.stdout.contains(body) && !done.stdout.contains("PRIVATE KEY"));
}
