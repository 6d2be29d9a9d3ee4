//! The `jwt_bearer` grant (RFC 7523 §2.1) against the fake provider, which checks each
//! assertion with the registered public key: a Google service-account key file (scope in
//! the assertion, token endpoint from the file) and a private key with issuer and
//! subject keep getting tokens, each with a fresh `jti`; a wrong subject is refused.

use std::time::Duration;

use serde_json::json;
use tokend::demo::fake_provider::{JwtClient, JwtKey};

use crate::support::*;

const S: fn(u64) -> Duration = Duration::from_secs;
const SA: &str = "tokend@project.iam.gserviceaccount.com";

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[tokio::test(start_paused = true)]
async fn a_service_account_key_and_an_issued_key_keep_getting_tokens() {
    let (clock, fake) = manual_provider(Duration::from_secs(300));
    let dir = tempfile::tempdir().unwrap();
    let (rsa_pem, rsa_public) = rsa_key();
    let (ec_pem, ec_public) = ec_key();
    let sa_json = json!({
        "type": "service_account",
        "project_id": "project",
        "private_key_id": "0123abcd",
        "private_key": rsa_pem,
        "client_email": SA,
        "token_uri": TOKEN_URL,
    });
    let sa = write(dir.path(), "sa.json", &sa_json.to_string());
    let ec = write(dir.path(), "ec.pem", &ec_pem);
    let mut google = JwtClient::new(SA, JwtKey::Rs256(rsa_public), TOKEN_URL);
    google.subject = None;
    fake.register_bearer_issuer(google);
    let mut issued = JwtClient::new(
        "https://ci.example.com",
        JwtKey::Es256(ec_public),
        TOKEN_URL,
    );
    issued.subject = Some("repo:deploy".into());
    fake.register_bearer_issuer(issued);
    let accounts = format!(
        "\n[accounts.google]\ngrant = \"jwt_bearer\"\ncredentials_file = \"{}\"\nscope = \"https://www.googleapis.com/auth/cloud-platform\"\n\
         \n[accounts.ci]\ngrant = \"jwt_bearer\"\ntoken_url = \"{TOKEN_URL}\"\nprivate_key = {{ file = \"{}\" }}\nassertion_issuer = \"https://ci.example.com\"\nassertion_subject = \"repo:deploy\"\nscope = \"deploy\"\n\
         \n[accounts.wrong]\ngrant = \"jwt_bearer\"\ntoken_url = \"{TOKEN_URL}\"\nprivate_key = {{ file = \"{}\" }}\nassertion_issuer = \"https://ci.example.com\"\nassertion_subject = \"repo:other\"\n",
        sa.display(),
        ec.display(),
        ec.display(),
    );
    let h = Harness::builder(fake, clock, dir).accounts(&accounts).await;
    h.advance(S(20 * 300)).await;
    for name in ["google", "ci"] {
        assert_eq!(h.account_state(name).await["state"], "ok", "{name}");
    }
    let (status, body) = h.get("/v1/token/google").await;
    assert_eq!(status, 200);
    assert_eq!(
        body["scope"], "https://www.googleapis.com/auth/cloud-platform",
        "the scope claim is what the provider granted: {body}"
    );
    let counts = h.fake.counts();
    assert!(counts.jwt_bearer_grants >= 2 * 20, "{counts:?}");
    let wrong = h.account_state("wrong").await;
    // Refused, but no refresh token to wait for: retried, never needs_reauth.
    assert_eq!(wrong["state"], "pending", "{wrong}");
    assert!(
        wrong["last_error"]
            .as_str()
            .unwrap()
            .contains("wrong iss or sub"),
        "{wrong}"
    );
    assert!(
        h.fake
            .assertion_rejections()
            .iter()
            .all(|r| *r == "wrong iss or sub")
    );
    let accepted = counts.jwt_bearer_grants - counts.rejected;
    assert_eq!(
        h.fake.distinct_jtis() as u64,
        accepted,
        "a fresh jti each time"
    );
}

/// `login`, `import` and `logout` handle refresh tokens, which a `jwt_bearer` account
/// never has: each refuses with a usage error that says where its tokens come from,
/// before touching the provider or the state; `check` shows the assertion, not the key.
#[tokio::test]
async fn login_import_and_logout_refuse_a_jwt_bearer_account_and_check_shows_it() {
    let setup = Setup::new();
    let (ec_pem, _) = ec_key();
    let key = write(setup.dir.path(), "ec.pem", &ec_pem);
    setup.write_config(&[format!(
        "\n[accounts.ci]\ngrant = \"jwt_bearer\"\ntoken_url = \"https://127.0.0.1:9/token\"\nprivate_key = {{ file = \"{}\" }}\nassertion_issuer = \"https://ci.example.com\"\nassertion_subject = \"repo:deploy\"\n",
        key.display()
    )]);
    for command in [&["login", "ci"][..], &["import", "ci"], &["logout", "ci"]] {
        let mut cmd = tokend();
        cmd.args(command).arg("--config").arg(setup.config_path());
        let out = run_cmd(&mut cmd, S(20)).await;
        let done = expect_code(&out, 64);
        assert!(
            done.stderr.contains("account ci uses the jwt_bearer grant")
                && done.stderr.contains("no refresh token")
                && done.stderr.contains("signs a new assertion"),
            "{command:?}: {}",
            done.stderr
        );
    }
    assert!(!setup.state_dir().join("ci.json").exists());
    let mut cmd = tokend();
    cmd.args(["check", "--config"]).arg(setup.config_path());
    let done = expect_code(&run_cmd(&mut cmd, S(20)).await, 0);
    let row = |label: &str| {
        done.stdout
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(label))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {label} row:\n{}", done.stdout))
            .to_string()
    };
    let shown = format!(
        "ES256 EC P-256 key from file {}, iss https://ci.example.com, sub repo:deploy",
        key.display()
    );
    assert_eq!(row("assertion:"), shown);
    assert_eq!(row("client:"), "none (the assertion is the grant)");
    assert!(!done.stdout.contains("BEGIN"), "{}", done.stdout);
}
