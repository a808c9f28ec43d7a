//! Single flight: at most one Controlplane request per repl; whoever asks
//! while it is out waits for its answer. Pure bookkeeping.
#![forbid(unsafe_code)]

use std::collections::HashMap;

#[derive(Debug)]
pub(crate) struct Flights<W> {
    waiting: HashMap<String, Vec<W>>,
}

impl<W> Flights<W> {
    pub(crate) fn new() -> Self {
        Flights {
            waiting: HashMap::new(),
        }
    }

    /// Adds `w` to the flight for `key` if there is one; else hands `w`
    /// back, and the caller decides whether to [`start`](Self::start) one.
    pub(crate) fn join(&mut self, key: &str, w: W) -> Result<(), W> {
        match self.waiting.get_mut(key) {
            Some(ws) => {
                ws.push(w);
                Ok(())
            }
            None => Err(w),
        }
    }

    /// Starts the flight for `key` with its first waiters.
    pub(crate) fn start(&mut self, key: &str, waiters: Vec<W>) {
        debug_assert!(!self.waiting.contains_key(key), "flight already out");
        self.waiting.insert(key.to_owned(), waiters);
    }

    /// Ends the flight; everyone who waited for it.
    pub(crate) fn finish(&mut self, key: &str) -> Vec<W> {
        self.waiting.remove(key).unwrap_or_default()
    }

    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_flight_per_key_collects_every_waiter() {
        let mut f = Flights::new();
        assert_eq!(f.join("r", 1), Err(1));
        f.start("r", vec![1]);
        for w in 2..=100 {
            assert_eq!(f.join("r", w), Ok(()));
        }
        assert_eq!(f.join("other", 7), Err(7));
        assert_eq!(f.in_flight(), 1);
        assert_eq!(f.finish("r"), (1..=100).collect::<Vec<_>>());
        assert_eq!(f.in_flight(), 0);
        assert_eq!(f.join("r", 5), Err(5), "a finished flight takes no one");
        assert!(f.finish("r").is_empty());
    }
}
