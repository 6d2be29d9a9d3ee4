//! What a provider URL must be before tokend sends a secret or a browser there: one set
//! of rules for configured endpoints, discovered metadata and `tokend login` alike.

use std::net::IpAddr;

use reqwest::Url;

/// The rules for every URL tokend sends secrets or a browser to: https, or plain http
/// only to a loopback host or with the explicit opt-in; no #fragment (RFC 6749 §3.1,
/// §3.2). Used for configured values and for discovered metadata alike.
pub fn check_endpoint_url(text: &str, allow_http: bool) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_http || is_loopback_host(&url) => {}
        "http" => {
            return Err("plain http:// sends secrets in clear text: use https://, a loopback address, or set allow_insecure_http = true".into());
        }
        other => return Err(format!("unsupported scheme {other:?}: use https://")),
    }
    if url.fragment().is_some() {
        return Err("an endpoint URL has no #fragment (RFC 6749 §3.1, §3.2)".into());
    }
    Ok(url)
}

/// Whether the URL's host is `localhost` or a loopback IP literal.
pub fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_anywhere_and_http_only_to_loopback_or_by_opt_in() {
        assert!(check_endpoint_url("https://auth.example.com/token", false).is_ok());
        for loopback in [
            "http://127.0.0.1:9000/t",
            "http://[::1]/t",
            "http://LocalHost/t",
        ] {
            assert!(check_endpoint_url(loopback, false).is_ok(), "{loopback}");
        }
        let err = check_endpoint_url("http://auth.internal/t", false).unwrap_err();
        assert!(err.contains("allow_insecure_http"), "{err}");
        assert!(check_endpoint_url("http://auth.internal/t", true).is_ok());
        let err = check_endpoint_url("ftp://x/t", true).unwrap_err();
        assert!(err.contains("unsupported scheme \"ftp\""), "{err}");
        let err = check_endpoint_url("https://x/t#frag", false).unwrap_err();
        assert!(err.contains("no #fragment"), "{err}");
        assert!(check_endpoint_url("not a url", false).is_err());
    }

    #[test]
    fn only_localhost_and_loopback_literals_are_loopback() {
        let host = |u: &str| is_loopback_host(&Url::parse(u).unwrap());
        assert!(host("http://localhost:1/"));
        assert!(host("http://127.0.0.2/"));
        assert!(host("http://[::1]/"));
        assert!(!host("http://localhost.example.com/"));
        assert!(!host("http://10.0.0.1/"));
        assert!(!host("unix:/run/x"));
    }
}
