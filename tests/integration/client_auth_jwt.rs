//! Client assertions against the fake provider, which checks them on its own (signature
//! with the registered public key or shared secret, `aud`, `exp`, `iat`, a `jti` used
//! once): `private_key_jwt` with RSA and EC keys, `client_secret_jwt` and a ready-made
//! assertion file keep refreshing; a replayed, expired or wrong-audience assertion is
//! refused and the account treats `invalid_client` as permanent. Paused clock throughout.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde_json::{Value, json};
use tokend::demo::fake_provider::{ClientSpec, FakeProvider, JwtClient, JwtKey};
use tokend::secret::Secret;
use tokend::signing::SigningKey;

use crate::support::*;

const S: fn(u64) -> Duration = Duration::from_secs;
const LIFETIME: Duration = Duration::from_secs(300);

/// Writes `text` to `dir/name`, readable by its owner only, as a key file should be.
fn secret_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// An assertion signed by the test itself (ES256), with `claims` as given.
fn forge(key_pem: &str, claims: &Value) -> String {
    let key = SigningKey::from_pem(&Secret::new(key_pem), None).unwrap();
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let input = format!("{}.{}", b64(&json!({"alg": "ES256"})), b64(claims));
    let sig = key.sign(input.as_bytes()).unwrap();
    format!(
        "{input}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig)
    )
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

/// An account of the in-process provider with `client_auth` and `rest`; a
/// `refresh_token` account is seeded from `fake`.
fn account(fake: &FakeProvider, name: &str, grant: &str, auth: &str, rest: &str) -> String {
    let seed = match grant {
        "refresh_token" => format!(
            "refresh_token = \"{}\"\n",
            fake.grant_refresh_token(name, Some("api"))
        ),
        _ => String::new(),
    };
    format!(
        "\n[accounts.{name}]\ngrant = \"{grant}\"\ntoken_url = \"{TOKEN_URL}\"\nclient_id = \"{name}\"\nclient_auth = \"{auth}\"\nscope = \"api\"\n{seed}{rest}"
    )
}

/// The account's state once its last refresh failed (bounded in paused time).
async fn until_error(h: &Harness, account: &str) -> Value {
    let deadline = tokio::time::Instant::now() + S(600);
    loop {
        let s = h.account_state(account).await;
        if s["last_error"].is_string() {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{account}: {s}");
        h.advance(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn every_method_keeps_refreshing_with_a_fresh_assertion_each_time() {
    let (clock, fake) = manual_provider(LIFETIME);
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path();
    let (rsa_pem, rsa_public) = rsa_key();
    let (ec_pem, ec_public) = ec_key();
    let rsa_file = secret_file(keys, "rsa.pem", &rsa_pem);
    let ec_file = secret_file(keys, "ec.pem", &ec_pem);
    let with_key = |id: &str, key: JwtKey| {
        fake.register(ClientSpec::assertion(
            id,
            JwtClient::new(id, key, TOKEN_URL),
        ));
    };
    with_key("rs", JwtKey::Rs256(rsa_public.clone()));
    with_key("ps", JwtKey::Ps256(rsa_public));
    with_key("es", JwtKey::Es256(ec_public));
    with_key("hs", JwtKey::Hs256("hs-secret".into()));
    let file = |p: &PathBuf| format!("private_key = {{ file = \"{}\" }}\n", p.display());
    let accounts = [
        account(
            &fake,
            "rs",
            "client_credentials",
            "private_key_jwt",
            &file(&rsa_file),
        ),
        account(
            &fake,
            "ps",
            "refresh_token",
            "private_key_jwt",
            &format!(
                "{}signing_alg = \"PS256\"\nkey_id = \"k1\"\n",
                file(&rsa_file)
            ),
        ),
        account(
            &fake,
            "es",
            "refresh_token",
            "private_key_jwt",
            &file(&ec_file),
        ),
        account(
            &fake,
            "hs",
            "client_credentials",
            "client_secret_jwt",
            "client_secret = \"hs-secret\"\n",
        ),
    ];
    let h = Harness::builder(fake, clock, dir)
        .accounts(&accounts.concat())
        .await;
    h.advance(S(24 * 300)).await; // about 30 refreshes each
    for name in ["rs", "ps", "es", "hs"] {
        assert_eq!(h.account_state(name).await["state"], "ok", "{name}");
        let (status, _) = h.get(&format!("/v1/token/{name}")).await;
        assert_eq!(status, 200, "{name}");
    }
    let counts = h.fake.counts();
    assert!(counts.token_requests >= 4 * 25, "{counts:?}");
    assert_eq!(counts.rejected, 0, "{:?}", h.fake.assertion_rejections());
    assert_eq!(
        h.fake.distinct_jtis() as u64,
        counts.token_requests,
        "a fresh jti in every request"
    );
}

/// A wrong `aud` is `invalid_client`: the account says so, keeps serving nothing it does
/// not have, and retries slowly, not in a loop.
#[tokio::test(start_paused = true)]
async fn a_wrong_audience_is_invalid_client_retried_slowly() {
    let (clock, fake) = manual_provider(LIFETIME);
    let dir = tempfile::tempdir().unwrap();
    let (ec_pem, ec_public) = ec_key();
    let key = secret_file(dir.path(), "ec.pem", &ec_pem);
    fake.register(ClientSpec::assertion(
        "es",
        JwtClient::new("es", JwtKey::Es256(ec_public), TOKEN_URL),
    ));
    let rest = format!(
        "private_key = {{ file = \"{}\" }}\nassertion_audience = \"https://elsewhere.example/token\"\n",
        key.display()
    );
    let text = account(&fake, "es", "client_credentials", "private_key_jwt", &rest);
    let h = Harness::builder(fake, clock, dir).accounts(&text).await;
    let state = until_error(&h, "es").await;
    assert_eq!(state["state"], "pending", "{state}");
    let error = state["last_error"].as_str().unwrap();
    assert!(error.contains("invalid_client"), "{state}");
    assert!(error.contains("wrong audience"), "{state}");
    assert_eq!(h.fake.assertion_rejections(), ["wrong audience"]);
    let calls = h.fake.counts().token_requests;
    h.advance(S(800)).await; // slow_retry is 15 min
    assert_eq!(h.fake.counts().token_requests, calls, "no quick retries");
}

/// A ready-made assertion is read again at every request and sent as it is: a provider
/// that takes each `jti` once refuses it the second time, an expired one is refused at
/// once, and a federated client (which accepts a token until it is replaced) keeps
/// working as the file is rewritten.
#[tokio::test(start_paused = true)]
async fn a_ready_made_assertion_is_reread_and_its_replay_and_expiry_are_refused() {
    let (clock, fake) = manual_provider(LIFETIME);
    let dir = tempfile::tempdir().unwrap();
    let (ec_pem, ec_public) = ec_key();
    let now = secs(epoch());
    // Like a projected token: issued at `iat`, valid for 50 minutes.
    let claims = |id: &str, jti: &str, iat: u64| json!({"iss": id, "sub": id, "aud": TOKEN_URL, "jti": jti, "iat": iat, "exp": iat + 3000});
    let write = |name: &str, claims: &Value| secret_file(dir.path(), name, &forge(&ec_pem, claims));
    let once = write("once.jwt", &claims("once", "j-1", now - 10));
    let expired = write("expired.jwt", &claims("expired", "j-2", now - 3001));
    let federated = write("federated.jwt", &claims("fed", "k8s-1", now - 10));
    for id in ["once", "expired", "fed"] {
        let mut client = JwtClient::new(id, JwtKey::Es256(ec_public.clone()), TOKEN_URL);
        client.reusable = id == "fed";
        fake.register(ClientSpec::assertion(id, client));
    }
    let file = |p: &PathBuf| format!("client_assertion = {{ file = \"{}\" }}\n", p.display());
    let accounts = [
        account(
            &fake,
            "once",
            "client_credentials",
            "private_key_jwt",
            &file(&once),
        ),
        account(
            &fake,
            "expired",
            "client_credentials",
            "private_key_jwt",
            &file(&expired),
        ),
        account(
            &fake,
            "fed",
            "client_credentials",
            "private_key_jwt",
            &file(&federated),
        ),
    ];
    let h = Harness::builder(fake, clock, dir)
        .accounts(&accounts.concat())
        .await;

    let state = until_error(&h, "expired").await;
    assert!(
        state["last_error"]
            .as_str()
            .unwrap()
            .contains("has expired"),
        "{state}"
    );
    let state = until_error(&h, "once").await;
    assert_eq!(
        state["state"], "degraded",
        "its first assertion worked: {state}"
    );
    let error = state["last_error"].as_str().unwrap();
    assert!(
        error.contains("invalid_client") && error.contains("jti replayed"),
        "{state}"
    );

    // The federated token is replaced half-way: the next requests carry the new one.
    h.advance(S(5 * 300)).await;
    secret_file(
        h.dir.path(),
        "federated.jwt",
        &forge(&ec_pem, &claims("fed", "k8s-2", now + 1500)),
    );
    h.advance(S(5 * 300)).await;
    assert_eq!(h.account_state("fed").await["state"], "ok");
    assert_eq!(h.get("/v1/token/fed").await.0, 200);
    let mut rejections = h.fake.assertion_rejections();
    rejections.sort();
    rejections.dedup();
    assert_eq!(rejections, ["jti replayed", "the assertion has expired"]);
    // j-1, j-2 (refused, never recorded), k8s-1 and k8s-2.
    assert_eq!(h.fake.distinct_jtis(), 3);
}

/// `tokend check` names each account's client authentication, the key's kind and where
/// it comes from, never the key or the assertion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_client_authentication_of_each_account() {
    let dir = tempfile::tempdir().unwrap();
    let (ec_pem, _) = ec_key();
    let key = secret_file(dir.path(), "ec.pem", &ec_pem);
    let token = secret_file(
        dir.path(),
        "azure-identity-token",
        "eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
    );
    let config = format!(
        "[state]\ndir = \"{state}\"\n\
         [accounts.okta]\ngrant = \"client_credentials\"\ntoken_url = \"https://id.example.com/token\"\nclient_id = \"c1\"\nclient_auth = \"private_key_jwt\"\nprivate_key = {{ file = \"{key}\" }}\nkey_id = \"k1\"\n\
         [accounts.azure]\ngrant = \"client_credentials\"\ntoken_url = \"https://login.example.com/token\"\nclient_id = \"c2\"\nclient_auth = \"private_key_jwt\"\nclient_assertion = {{ file = \"{token}\" }}\n\
         [accounts.shared]\ngrant = \"client_credentials\"\ntoken_url = \"https://id.example.com/token\"\nclient_id = \"c3\"\nclient_auth = \"client_secret_jwt\"\nclient_secret = {{ env = \"SHARED_SECRET\" }}\nassertion_audience = \"https://id.example.com\"\n",
        state = dir.path().join("state").display(),
        key = key.display(),
        token = token.display(),
    );
    let path = secret_file(dir.path(), "tokend.toml", &config);
    let mut cmd = tokend();
    cmd.args(["check", "--config"]).arg(&path);
    cmd.env("SHARED_SECRET", "shared-secret-value");
    let out = expect_code(&run_cmd(&mut cmd, EXIT_TIMEOUT).await, 0).stdout;
    let client = |account: &str| {
        let plan = out.split(&format!("account {account}\n")).nth(1).unwrap();
        plan.lines()
            .find(|l| l.trim_start().starts_with("client:"))
            .unwrap()
            .to_string()
    };
    assert!(
        client("okta").contains(&format!(
            "c1 (private_key_jwt, ES256 EC P-256 key from file {}, kid k1, aud the token URL)",
            key.display()
        )),
        "{out}"
    );
    assert!(
        client("azure").contains(&format!(
            "private_key_jwt, ready-made assertion read from {} at every request",
            token.display()
        )),
        "{out}"
    );
    assert!(
        client("shared").contains("client_secret_jwt, HS256 over the secret from env SHARED_SECRET, aud https://id.example.com"),
        "{out}"
    );
    for secret in ["shared-secret-value", "c2ln", &ec_pem[30..60]] {
        assert!(!out.contains(secret), "{out}");
    }
}
