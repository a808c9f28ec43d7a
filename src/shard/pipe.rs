//! splice(2) and its pipes: the syscalls behind the session's splice ops.

use std::io;
use std::os::fd::RawFd;

use crate::session::Pipe;

/// Pipes kept for reuse per shard; more concurrent splices make their own.
pub const POOL: usize = 32;

/// splice(2) from `fd_in` to `fd_out`, never blocking; bytes moved or the
/// errno.
pub fn splice_nb(fd_in: RawFd, fd_out: RawFd, len: usize) -> Result<usize, i32> {
    // SAFETY: plain descriptors, no user memory involved.
    let n = unsafe {
        libc::splice(
            fd_in,
            std::ptr::null_mut(),
            fd_out,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    } else {
        Ok(n as usize)
    }
}

/// A non-blocking pipe, asking for `size` bytes of capacity.
pub fn new_pipe(size: u32) -> io::Result<Pipe> {
    let mut fds = [0; 2];
    // SAFETY: fds is two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut pipe = Pipe {
        r: fds[0],
        w: fds[1],
        cap: 65536,
    };
    // SAFETY: our pipe. A refusal (fs.pipe-max-size) keeps the default size.
    let got = unsafe { libc::fcntl(pipe.w, libc::F_SETPIPE_SZ, size as libc::c_int) };
    let got = if got > 0 {
        got
    } else {
        // SAFETY: as above.
        unsafe { libc::fcntl(pipe.w, libc::F_GETPIPE_SZ) }
    };
    if got > 0 {
        pipe.cap = got as u32;
    }
    Ok(pipe)
}

pub fn close_pipe(pipe: Pipe) {
    // SAFETY: both ends are ours; the session gave the pipe back.
    unsafe {
        libc::close(pipe.r);
        libc::close(pipe.w);
    }
}
