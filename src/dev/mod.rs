//! Development and test fakes that speak the real protocols over real
//! sockets. The fake Conman is embedded so that `eval-proxy --dev` works on
//! a fresh machine with nothing else running; `eval-loadgen` runs both fakes
//! as processes of their own.

pub mod conman;
pub mod controlplane;
pub mod tls;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::warn;

/// The wake-up connection goes to our own listener on loopback, so anything
/// slower than this means the listener is already gone.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// A poisoned lock still guards plain data the fakes can keep using.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where to connect to reach a listener bound to `local` (an unspecified
/// address means loopback).
fn wake_addr(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, local.port())
}

/// Stops a fake's accept thread: raises `stopping`, wakes whatever waits on
/// `stopped`, then connects to the listener so the blocking accept() looks
/// at the flag, and joins the thread. `what` names the fake in logs.
fn stop_accept_thread(
    what: &str,
    local: SocketAddr,
    accept: JoinHandle<()>,
    stopping: &Mutex<bool>,
    stopped: &Condvar,
) {
    *lock(stopping) = true;
    stopped.notify_all();
    match TcpStream::connect_timeout(&wake_addr(local), WAKE_TIMEOUT) {
        Ok(_) => {
            if accept.join().is_err() {
                warn!("{what} accept thread panicked");
            }
        }
        Err(error) => warn!(%error, "could not wake the {what} accept thread"),
    }
}
