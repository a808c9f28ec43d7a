//! Static placement: rendezvous (highest-random-weight) hashing of the repl
//! id over the configured VMs, with pinned repls. Adding or removing a VM
//! moves only the repls that land on or came from it, and the runner-up of a
//! repl is where it goes when its VM is excluded.
#![forbid(unsafe_code)]

use std::collections::HashMap;

/// FNV-1a: stable across processes and Rust releases (unlike
/// `DefaultHasher`), so every proxy instance places a repl alike.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64's finalizer: FNV alone mixes the last bytes poorly, and
/// repl ids often differ only there.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug)]
pub(crate) struct Rendezvous<T> {
    /// (vm id, mixed hash of the id, value)
    vms: Vec<(String, u64, T)>,
    /// repl → index into `vms`.
    pins: HashMap<String, usize>,
}

impl<T> Rendezvous<T> {
    /// `pins` name VMs by id; an unknown id is an error naming it.
    pub(crate) fn new(
        vms: Vec<(String, T)>,
        pins: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, String> {
        let vms: Vec<_> = vms
            .into_iter()
            .map(|(id, v)| {
                let h = mix(fnv1a(id.as_bytes()));
                (id, h, v)
            })
            .collect();
        let mut map = HashMap::new();
        for (repl, vm) in pins {
            let i = vms.iter().position(|(id, _, _)| *id == vm).ok_or(vm)?;
            map.insert(repl, i);
        }
        Ok(Rendezvous { vms, pins: map })
    }

    /// The VM for `repl`: its pin, else the highest score among the VMs not
    /// in `exclude` (the VMs that failed in the session's attempts); `None`
    /// once every VM is excluded. The only VM of a one-VM list is never
    /// excluded, since retrying the one VM there is beats failing the
    /// session.
    pub(crate) fn pick(&self, repl: &str, exclude: &[String]) -> Option<(&str, &T)> {
        let allowed = |id: &str| self.vms.len() == 1 || !exclude.iter().any(|x| x == id);
        if let Some(&i) = self.pins.get(repl) {
            let (id, _, v) = &self.vms[i];
            if allowed(id) {
                return Some((id, v));
            }
        }
        let h = fnv1a(repl.as_bytes());
        self.vms
            .iter()
            .filter(|(id, _, _)| allowed(id))
            .max_by(|a, b| mix(h ^ a.1).cmp(&mix(h ^ b.1)).then_with(|| b.0.cmp(&a.0)))
            .map(|(id, _, v)| (id.as_str(), v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: usize) -> Rendezvous<usize> {
        Rendezvous::new((0..n).map(|i| (format!("vm-{i}"), i)).collect(), []).unwrap()
    }

    #[test]
    fn same_repl_same_vm_and_spread_is_even() {
        let r = ring(4);
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let repl = format!("repl-{i}");
            let (_, &v) = r.pick(&repl, &[]).unwrap();
            assert_eq!(r.pick(&repl, &[]).unwrap().1, &v);
            counts[v] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn removing_a_vm_moves_only_its_repls() {
        let four = ring(4);
        let three = Rendezvous::new((0..3).map(|i| (format!("vm-{i}"), i)).collect(), []).unwrap();
        for i in 0..2000 {
            let repl = format!("repl-{i}");
            let (id4, _) = four.pick(&repl, &[]).unwrap();
            let (id3, _) = three.pick(&repl, &[]).unwrap();
            if id4 != "vm-3" {
                assert_eq!(id4, id3, "{repl}");
            }
        }
    }

    #[test]
    fn exclude_gives_the_runner_up_which_is_also_the_next_vm_when_the_first_goes() {
        let r = ring(4);
        for i in 0..500 {
            let repl = format!("repl-{i}");
            let (first, _) = r.pick(&repl, &[]).unwrap();
            let (second, _) = r.pick(&repl, &[first.to_owned()]).unwrap();
            assert_ne!(first, second);
            // Excluding some other VM changes nothing.
            let other = if first == "vm-0" { "vm-1" } else { "vm-0" };
            assert_eq!(r.pick(&repl, &[other.to_owned()]).unwrap().0, first);
            let without: Vec<_> = (0..4)
                .map(|i| format!("vm-{i}"))
                .filter(|id| id != first)
                .map(|id| (id, 0))
                .collect();
            let smaller = Rendezvous::new(without, []).unwrap();
            assert_eq!(smaller.pick(&repl, &[]).unwrap().0, second);
        }
    }

    #[test]
    fn several_excludes_give_the_best_of_the_rest_then_none() {
        let r = ring(4);
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for i in 0..500 {
            let repl = format!("repl-{i}");
            // Excluding the VMs in order of preference walks down the
            // repl's order, never back to an excluded one.
            let mut excluded: Vec<String> = Vec::new();
            for _ in 0..4 {
                let (next, _) = r.pick(&repl, &excluded).unwrap();
                assert!(!excluded.iter().any(|x| x == next), "{repl}");
                // The best of the rest is what a ring without them picks.
                let rest: Vec<_> = (0..4)
                    .map(|i| format!("vm-{i}"))
                    .filter(|id| !excluded.contains(id))
                    .map(|id| (id, 0))
                    .collect();
                let smaller = Rendezvous::new(rest, []).unwrap();
                assert_eq!(smaller.pick(&repl, &[]).unwrap().0, next);
                excluded.push(next.to_owned());
            }
            assert!(r.pick(&repl, &excluded).is_none());
            // Unknown and repeated names change nothing.
            assert_eq!(
                r.pick(&repl, &ids(&["zz", "zz"])).unwrap().0,
                r.pick(&repl, &[]).unwrap().0
            );
        }
        let pinned = Rendezvous::new(
            vec![
                ("a".to_owned(), 1),
                ("b".to_owned(), 2),
                ("c".to_owned(), 3),
            ],
            [("special".to_owned(), "b".to_owned())],
        )
        .unwrap();
        assert_eq!(pinned.pick("special", &ids(&["a", "c"])).unwrap().0, "b");
        let other = pinned.pick("special", &ids(&["b"])).unwrap().0;
        let last = if other == "a" { "c" } else { "a" };
        assert_eq!(pinned.pick("special", &ids(&["b", other])).unwrap().0, last);
        assert!(pinned.pick("special", &ids(&["a", "b", "c"])).is_none());
    }

    #[test]
    fn pins_win_unless_excluded_and_the_only_vm_is_never_excluded() {
        let r = Rendezvous::new(
            vec![("a".to_owned(), 1), ("b".to_owned(), 2)],
            [("special".to_owned(), "b".to_owned())],
        )
        .unwrap();
        assert_eq!(r.pick("special", &[]).unwrap().0, "b");
        assert_eq!(r.pick("special", &["b".to_owned()]).unwrap().0, "a");
        let one = Rendezvous::new(vec![("a".to_owned(), 1)], []).unwrap();
        assert_eq!(one.pick("x", &["a".to_owned()]).unwrap().0, "a");
        let none = Rendezvous::<u8>::new(vec![], []).unwrap();
        assert!(none.pick("x", &[]).is_none());
    }

    #[test]
    fn pin_to_unknown_vm_is_an_error() {
        let e = Rendezvous::new(
            vec![("a".to_owned(), 1)],
            [("r".to_owned(), "zz".to_owned())],
        )
        .unwrap_err();
        assert_eq!(e, "zz");
    }

    #[test]
    fn hash_is_stable_across_builds() {
        // Pinned values: another proxy version must place repls the same way.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let r = ring(3);
        let got: Vec<_> = (0..8)
            .map(|i| r.pick(&format!("repl-{i}"), &[]).unwrap().1.to_string())
            .collect();
        assert_eq!(got.concat(), "12001002");
    }
}
