//! The Controlplane HTTP/1.1 client on the control shard's glommio
//! executor: keep-alive connections per base URL, a timeout on every
//! request, failover to the next URL when one is down, and Conman host names
//! resolved off the executor.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::sync::Semaphore;
use tracing::debug;

use super::http::{self, Response};
use super::placer::{Failure, Placement};
use super::stats::ControlStats;
use super::url::Url;
use super::wire::Found;
use super::wire::PlacementFailure;
use super::ControlplaneConfig;

struct Endpoint {
    url: Url,
    host_header: String,
    idle: RefCell<Vec<TcpStream>>,
    /// Bounds the requests (and so connections) open to this URL at once.
    permits: Semaphore,
}

pub(crate) struct Client {
    endpoints: Vec<Endpoint>,
    timeout: Duration,
    max_idle: usize,
    /// The URL that answered last: asked first, so that one dead URL costs a
    /// timeout once, not on every request.
    preferred: Cell<usize>,
    stats: Arc<ControlStats>,
}

/// How one attempt at one URL ended, when it did not end with a response.
enum AttemptError {
    Failed(PlacementFailure),
    /// A reused keep-alive connection turned out closed before answering.
    Stale,
}

/// `fut`, or `on_timeout` once `d` has passed.
async fn within<T>(d: Duration, on_timeout: T, fut: impl Future<Output = T>) -> T {
    futures_lite::future::or(fut, async {
        glommio::timer::sleep(d).await;
        on_timeout
    })
    .await
}

/// An IP literal as is; a name on glommio's blocking pool, since a
/// resolver may take seconds and the executor must never block.
async fn resolve(url: &Url) -> Option<SocketAddr> {
    if let Some(ip) = url.ip() {
        return Some(SocketAddr::new(ip, url.port));
    }
    let (host, port) = (url.host.clone(), url.port);
    glommio::executor()
        .spawn_blocking(move || (host.as_str(), port).to_socket_addrs().ok()?.next())
        .await
}

impl Client {
    /// `urls` were validated by `spawn`.
    pub(crate) fn new(cfg: &ControlplaneConfig, urls: Vec<Url>, stats: Arc<ControlStats>) -> Self {
        let max = cfg.max_connections.max(1);
        Client {
            endpoints: urls
                .into_iter()
                .map(|url| Endpoint {
                    host_header: url.host_header(),
                    url,
                    idle: RefCell::new(Vec::new()),
                    permits: Semaphore::new(max as u64),
                })
                .collect(),
            timeout: cfg.request_timeout,
            max_idle: max,
            preferred: Cell::new(0),
            stats,
        }
    }

    pub(crate) async fn fetch(&self, repl: &str, exclude: &[String]) -> Result<Placement, Failure> {
        let n = self.endpoints.len();
        let start = self.preferred.get();
        let mut last = Failure::from(PlacementFailure::Unavailable);
        for k in 0..n {
            let i = (start + k) % n;
            let ep = &self.endpoints[i];
            let mut request = Vec::with_capacity(256);
            http::write_placement_request(&mut request, &ep.url, &ep.host_header, repl, exclude);
            self.stats.controlplane_requests.fetch_add(1, Relaxed);
            let response = within(
                self.timeout,
                Err(PlacementFailure::Timeout),
                self.attempt(ep, &request),
            )
            .await;
            let response = match response {
                Ok(r) => r,
                // Not a Controlplane, or a broken one: no other URL is
                // asked, since they all run the same code.
                Err(PlacementFailure::BadResponse) => {
                    return Err(PlacementFailure::BadResponse.into())
                }
                // Timed out or unreachable: the next URL may do better.
                Err(reason) => {
                    debug!(url = %ep.host_header, reason = reason.as_str(), "controlplane attempt failed");
                    last = reason.into();
                    continue;
                }
            };
            match http::placement_answer(&response) {
                // A gateway in front of a dead instance: try the next URL.
                Err(f) if f.reason == PlacementFailure::Unavailable => last = f,
                Err(f) => {
                    self.preferred.set(i);
                    return Err(f);
                }
                Ok(answer) => {
                    self.preferred.set(i);
                    let addr = within(self.timeout, None, resolve(&answer.conman))
                        .await
                        .ok_or(PlacementFailure::BadResponse)?;
                    return Ok(Placement {
                        found: Arc::new(Found {
                            vm: answer.vm,
                            addr,
                            host: answer.conman.host_header(),
                            tls: answer.conman.tls.then(|| answer.conman.host.clone()),
                            path: answer.conman.path,
                        }),
                        ttl: answer.ttl,
                    });
                }
            }
        }
        Err(last)
    }

    /// A request other than a placement (the revocation sync): `build`
    /// writes it for a URL; the URLs are tried in turn, each within the
    /// request timeout, until one answers (with any status). Neither the
    /// placement counters nor the breaker see it.
    pub(crate) async fn call(
        &self,
        build: impl Fn(&mut Vec<u8>, &Url, &str),
    ) -> Result<Response, PlacementFailure> {
        let n = self.endpoints.len();
        let start = self.preferred.get();
        let mut last = PlacementFailure::Unavailable;
        for k in 0..n {
            let ep = &self.endpoints[(start + k) % n];
            let mut request = Vec::with_capacity(256);
            build(&mut request, &ep.url, &ep.host_header);
            match within(
                self.timeout,
                Err(PlacementFailure::Timeout),
                self.attempt(ep, &request),
            )
            .await
            {
                Ok(r) if matches!(r.status, 500 | 502 | 503 | 504) => {
                    last = PlacementFailure::Unavailable
                }
                Ok(r) => return Ok(r),
                Err(reason) => last = reason,
            }
        }
        Err(last)
    }

    /// One request to one URL: on an idle keep-alive connection if there is
    /// one that still works, else on a new one.
    async fn attempt(&self, ep: &Endpoint, request: &[u8]) -> Result<Response, PlacementFailure> {
        let _permit = ep
            .permits
            .acquire_permit(1)
            .await
            .map_err(|_| PlacementFailure::Unavailable)?;
        loop {
            let Some(conn) = ep.idle.borrow_mut().pop() else {
                break;
            };
            match self.exchange(ep, conn, request, true).await {
                Ok(r) => return Ok(r),
                Err(AttemptError::Stale) => continue,
                Err(AttemptError::Failed(reason)) => return Err(reason),
            }
        }
        let addr = resolve(&ep.url)
            .await
            .ok_or(PlacementFailure::Unavailable)?;
        let conn = TcpStream::connect(addr).await.map_err(|e| {
            debug!(%addr, error = %e, "controlplane connect failed");
            PlacementFailure::Unavailable
        })?;
        // Requests are one small write each; Nagle would only delay them.
        let _ = conn.set_nodelay(true);
        match self.exchange(ep, conn, request, false).await {
            Ok(r) => Ok(r),
            Err(AttemptError::Stale) => Err(PlacementFailure::Unavailable),
            Err(AttemptError::Failed(reason)) => Err(reason),
        }
    }

    async fn exchange(
        &self,
        ep: &Endpoint,
        mut conn: TcpStream,
        request: &[u8],
        reused: bool,
    ) -> Result<Response, AttemptError> {
        // A dead reused connection fails here or reads EOF below, before a
        // byte of the answer: then, and only then, the request is sent again
        // (an idempotent GET, or a revocation, which adding twice leaves
        // as once).
        let lost = || {
            if reused {
                AttemptError::Stale
            } else {
                AttemptError::Failed(PlacementFailure::Unavailable)
            }
        };
        conn.write_all(request).await.map_err(|_| lost())?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            let n = match conn.read(&mut chunk).await {
                Ok(n) => n,
                Err(_) if buf.is_empty() => return Err(lost()),
                Err(_) => return Err(AttemptError::Failed(PlacementFailure::Unavailable)),
            };
            if n == 0 && buf.is_empty() {
                return Err(lost());
            }
            buf.extend_from_slice(&chunk[..n]);
            match http::parse_response(&buf, n == 0) {
                Ok(Some((response, used))) => {
                    if response.keep_alive && used == buf.len() {
                        let mut idle = ep.idle.borrow_mut();
                        if idle.len() < self.max_idle {
                            idle.push(conn);
                        }
                    }
                    return Ok(response);
                }
                Ok(None) if n == 0 => {
                    return Err(AttemptError::Failed(PlacementFailure::Unavailable))
                }
                Ok(None) => {}
                Err(_) => return Err(AttemptError::Failed(PlacementFailure::BadResponse)),
            }
        }
    }
}
