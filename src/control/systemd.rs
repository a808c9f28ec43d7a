//! systemd's side of the lifecycle: readiness notifications (`sd_notify(3)`)
//! so that `Type=notify` units know when the proxy serves, and which
//! process is the service's main one after a handover (`MAINPID=`).
//! Socket activation (`LISTEN_FDS`) is read in `shard::listener`.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` to `$NOTIFY_SOCKET`, if systemd set one; errors are
/// logged, never fatal (the proxy serves either way).
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let bytes = path.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            // An abstract socket: '@' stands for the leading NUL.
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&path)?,
        };
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(err) = sent {
        tracing::warn!(%err, state, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_reaches_the_socket_systemd_named() {
        let dir = std::env::temp_dir().join(format!("eval-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        // Only this test sets the variable; nothing else in the unit tests
        // reads it.
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify("READY=1\nMAINPID=42");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nMAINPID=42");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
