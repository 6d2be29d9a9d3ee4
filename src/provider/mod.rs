//! The provider client ([`Provider`]): token requests, device authorization (RFC 8628
//! §3.1), revocation (RFC 7009) and metadata fetches, each a turn at the host's gate then
//! one bounded exchange with typed failures. It does not decide when to call or what next.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use serde_json::Value;
use zeroize::Zeroize;

use crate::clock::Clock;
use crate::config::{AccountConfig, Grant, HostLimits};
use crate::secret::Secret;

mod assertion;
pub mod discovery;
mod error;
mod gate;
mod request;
mod response;
mod transport;

pub use error::{ErrorClass, ProviderError, RetryAfter, transport_message};
pub use gate::Turn;
pub use request::{DEVICE_CODE_GRANT, JWT_BEARER_GRANT, TokenGrant};
pub use response::{DeviceAuthorization, TokenResponse, jwt_exp, normalize_scope, parse_response};
pub use transport::{HttpClients, Transport};

use assertion::{bearer_assertion, client_assertion};
use gate::HostGates;
use request::{PreparedRequest, build_request, token_url};
use response::{error_answer, parse_device_authorization, success_object};
use transport::RawResponse;

/// The token-endpoint client. Cheap to clone; one is shared by every account so
/// connections are reused.
#[derive(Clone)]
pub struct Provider {
    transport: Transport,
    gates: Arc<HostGates>,
    /// Dates client assertions (`iat`, `exp`).
    clock: Clock,
}

impl Provider {
    pub fn new(transport: Transport) -> Provider {
        Provider {
            transport,
            gates: Arc::new(HostGates::new(HostLimits::default())),
            clock: Clock::system(),
        }
    }

    /// The same client dating its client assertions by `clock` (the daemon's).
    pub fn with_clock(mut self, clock: Clock) -> Provider {
        self.clock = clock;
        self
    }

    /// The same client with other per-host limits (before any request is made).
    pub fn with_host_limits(mut self, limits: HostLimits) -> Provider {
        self.gates = Arc::new(HostGates::new(limits));
        self
    }

    /// Waits for a turn at `url`'s host: a free slot, then its paced start time. Waiting
    /// sends nothing, so it can be abandoned (a dropped wait may leave one start time
    /// unused).
    pub async fn turn(&self, url: &Url) -> Turn {
        self.gates.turn(url).await
    }

    /// A turn at `account`'s token endpoint (see [`Provider::turn`]).
    pub async fn token_turn(&self, account: &AccountConfig) -> Result<Turn, ProviderError> {
        Ok(self.turn(token_url(account)?).await)
    }

    /// Real HTTP(S) with the system's trust roots (and accounts' extra CA bundles).
    pub fn http(connect_timeout: Duration) -> Result<Provider, ProviderError> {
        let clients = HttpClients::new(connect_timeout);
        // Built now, so a TLS setup that cannot work stops the start with its own error.
        clients.check()?;
        Ok(Provider::new(Transport::Http(Arc::new(clients))))
    }

    /// Sends one token request for `account` and parses the answer. The whole exchange,
    /// body included, is bounded by the account's timeout and response-size limit.
    pub async fn request_token(
        &self,
        account: &AccountConfig,
        grant: TokenGrant<'_>,
    ) -> Result<TokenResponse, ProviderError> {
        let turn = self.token_turn(account).await?;
        self.request_token_in(turn, account, grant).await
    }

    /// [`Provider::request_token`] in a turn already waited for: the caller can do
    /// something (persist a mark) between getting its turn and sending.
    pub async fn request_token_in(
        &self,
        turn: Turn,
        account: &AccountConfig,
        grant: TokenGrant<'_>,
    ) -> Result<TokenResponse, ProviderError> {
        let url = token_url(account)?;
        let mut params = grant.params();
        let bearer = match (grant, &account.grant) {
            (TokenGrant::JwtBearer, Grant::JwtBearer(b)) => {
                Some((bearer_assertion(account, b, self.clock.now())?, b))
            }
            (TokenGrant::JwtBearer, _) => {
                return Err(ProviderError::Assertion(
                    "the account's grant is not jwt_bearer".into(),
                ));
            }
            _ => None,
        };
        if let Some((assertion, _)) = &bearer {
            params.push(("assertion", assertion.expose()));
        }
        let in_claim = bearer.as_ref().is_some_and(|(_, b)| b.scope_in_claim);
        if grant.sends_scope()
            && !in_claim
            && let Some(scope) = &account.scope
        {
            params.push(("scope", scope));
        }
        let assertion = client_assertion(account, self.clock.now())?;
        let mut secrets = grant.secrets();
        secrets.extend(bearer.as_ref().map(|(a, _)| a));
        secrets.extend(account.client_secret.as_ref());
        secrets.extend(assertion.as_ref());
        let request = build_request(account, params, true, assertion.as_ref());
        let (status, headers, body) = self.exchange(turn, account, url, Some(request)).await?;
        parse_response(status, &headers, &body, &secrets)
    }

    /// RFC 8628 §3.1: asks for a device code and a user code.
    pub async fn device_authorization(
        &self,
        account: &AccountConfig,
    ) -> Result<DeviceAuthorization, ProviderError> {
        let url = account
            .endpoints
            .device_authorization
            .as_ref()
            .ok_or(ProviderError::NoEndpoint("device_authorization_endpoint"))?;
        let mut params = Vec::new();
        if let Some(scope) = &account.scope {
            params.push(("scope", scope.as_str()));
        }
        let assertion = client_assertion(account, self.clock.now())?;
        let secrets: Vec<&Secret> = account.client_secret.iter().chain(&assertion).collect();
        let request = build_request(account, params, true, assertion.as_ref());
        let (status, headers, body) = self
            .exchange(self.turn(url).await, account, url, Some(request))
            .await?;
        parse_device_authorization(status, &headers, &body, &secrets)
    }

    /// RFC 7009 §2.1: revokes a refresh token. Success is any 2xx (§2.2: also for a
    /// token the provider no longer knows).
    pub async fn revoke(
        &self,
        account: &AccountConfig,
        refresh_token: &Secret,
    ) -> Result<(), ProviderError> {
        let url = account
            .endpoints
            .revocation
            .as_ref()
            .ok_or(ProviderError::NoEndpoint("revocation_endpoint"))?;
        let params = vec![
            ("token", refresh_token.expose()),
            ("token_type_hint", "refresh_token"),
        ];
        let assertion = client_assertion(account, self.clock.now())?;
        let mut secrets = vec![refresh_token];
        secrets.extend(account.client_secret.as_ref());
        secrets.extend(assertion.as_ref());
        let request = build_request(account, params, false, assertion.as_ref());
        let (status, headers, body) = self
            .exchange(self.turn(url).await, account, url, Some(request))
            .await?;
        if let Some(e) = error_answer(status, &headers, &body, &secrets) {
            return Err(e);
        }
        Ok(())
    }

    /// GETs a JSON document (discovery metadata) with the account's limits and trust.
    pub async fn get_json(
        &self,
        account: &AccountConfig,
        url: &Url,
    ) -> Result<serde_json::Map<String, Value>, ProviderError> {
        let (status, headers, body) = self
            .exchange(self.turn(url).await, account, url, None)
            .await?;
        success_object(status, &headers, &body, &[])
    }

    /// One exchange: a POST of `request`, or a GET without one. The whole exchange, body
    /// included, is bounded by the account's timeout and response-size limit.
    async fn exchange(
        &self,
        _turn: Turn,
        account: &AccountConfig,
        url: &Url,
        mut request: Option<PreparedRequest>,
    ) -> Result<RawResponse, ProviderError> {
        let limit = account.limits.max_response_bytes;
        let timeout = account.limits.timeout;
        let exchange = self.transport.send(account, url, request.as_ref(), limit);
        // The turn was waited for before: waiting is not part of the exchange's timeout.
        let outcome = tokio::time::timeout(timeout, exchange).await;
        if let Some(r) = request.as_mut() {
            r.body.zeroize();
        }
        outcome.map_err(|_| ProviderError::Timeout(timeout))?
    }
}
