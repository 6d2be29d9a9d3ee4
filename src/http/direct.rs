//! The API as the listeners serve it: the token reads, every consumer's every call, take
//! a direct path to their handler; every other request goes through the router.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::{Bytes, HttpBody};
use axum::extract::{FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use tower::Service;

use super::{
    ApiError, ApiState, Guarded, HTTP_REQUESTS, JSON_READ, PLAIN_READ, TokenQuery, current_token,
    router, token_answer,
};
use crate::metrics::HttpRoute;

/// The router, and before it a direct path for `GET /v1/token/{account}` and
/// `GET /v1/token/{account}/access_token` without a query and with a plain account name:
/// no route table, no URL-parameter map, no boxed route service or extractor chain. It
/// answers exactly as the router would: the same Host check, guards, handler and
/// counters (`check_host`, `Guarded`, `token_answer` in `http/mod.rs`); a read it does
/// not recognise (a query, a percent-encoded name, HEAD) goes to the router.
#[derive(Clone)]
pub struct Api {
    state: Arc<ApiState>,
    router: Router,
}

impl Api {
    pub fn new(state: ApiState) -> Api {
        Api {
            router: router(state.clone()),
            state: Arc::new(state),
        }
    }
}

type Direct = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<B> Service<Request<B>> for Api
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Direct, <Router as Service<Request<B>>>::Future>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match token_read(&request) {
            Some(route) => {
                let state = Arc::clone(&self.state);
                Either::Left(Box::pin(
                    async move { Ok(read(&state, request, route).await) },
                ))
            }
            None => Either::Right(self.router.call(request)),
        }
    }
}

/// Which token read `request` is, when the direct path can take it: [`JSON_READ`] or
/// [`PLAIN_READ`].
fn token_read<B>(request: &Request<B>) -> Option<usize> {
    if request.method() != http::Method::GET || request.uri().query().is_some() {
        return None;
    }
    let (account, plain) = split_read(request.uri().path())?;
    let plain_name = !account.is_empty() && !account.contains(['%', '/']);
    match (plain_name, plain) {
        (true, false) => Some(JSON_READ),
        (true, true) => Some(PLAIN_READ),
        (false, _) => None,
    }
}

/// `/v1/token/{account}` → (`account`, false); `/v1/token/{account}/access_token` →
/// (`account`, true).
fn split_read(path: &str) -> Option<(&str, bool)> {
    let rest = path.strip_prefix("/v1/token/")?;
    Some(match rest.strip_suffix("/access_token") {
        Some(account) => (account, true),
        None => (rest, false),
    })
}

async fn read<B>(state: &ApiState, request: Request<B>, route: usize) -> Response {
    let response = match super::check_host(&request) {
        Ok(()) => {
            let (mut parts, _body) = request.into_parts();
            answer(state, &mut parts, route)
                .await
                .unwrap_or_else(IntoResponse::into_response)
        }
        Err(refused) => refused.into_response(),
    };
    HTTP_REQUESTS.record(&HttpRoute::Listed(route), response.status().as_u16());
    response
}

async fn answer(
    state: &ApiState,
    parts: &mut http::request::Parts,
    route: usize,
) -> Result<Response, ApiError> {
    let Guarded(caller) = Guarded::from_request_parts(parts, state).await?;
    let (account, _) = split_read(parts.uri.path()).unwrap_or_default();
    let token = current_token(state, &caller, account, &TokenQuery::default()).await?;
    Ok(token_answer(state, token, route == PLAIN_READ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    #[test]
    fn only_plain_token_reads_take_the_direct_path() {
        assert_eq!(token_read(&get("/v1/token/zywave")), Some(JSON_READ));
        assert_eq!(
            token_read(&get("/v1/token/zywave/access_token")),
            Some(PLAIN_READ)
        );
        for routed in [
            "/v1/token/zywave?min_valid=60",
            "/v1/token/zy%77ave",
            "/v1/token/",
            "/v1/token//access_token",
            "/v1/token/a/b",
            "/v1/token/a/access_token/",
            "/v1/accounts",
            "/proxy/zywave/v1/token/x",
        ] {
            assert_eq!(token_read(&get(routed)), None, "{routed}");
        }
        let head = Request::head("/v1/token/zywave").body(()).unwrap();
        assert_eq!(token_read(&head), None);
    }
}
