//! Beam search's reorder as copies in place: afterwards sequence `b` holds what
//! sequence `idx[b]` held (`idx` may repeat and skip sequences). Pure: turns
//! `idx` into an ordered list of per-sequence moves that the engine issues on
//! one copy queue (which runs them in order) for every layer alike.
//!
//! Only sequences that change are written, straight from their source in the
//! same buffer, once no other sequence still needs their old content. Cycles
//! (`0 <- 1 <- 0`) leave no such sequence: one of each cycle is first saved to
//! a scratch slot and later sequences read it from there. Beam search rarely
//! forms cycles, so the scratch is usually empty.

/// One per-sequence copy of a reorder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Move {
    /// Copy sequence `src` into scratch slot `slot`.
    Save {
        /// Sequence copied.
        src: usize,
        /// Scratch slot written.
        slot: usize,
    },
    /// Copy sequence `src` over sequence `dst` (in the same buffer).
    Copy {
        /// Sequence read.
        src: usize,
        /// Sequence written.
        dst: usize,
    },
    /// Copy scratch slot `slot` over sequence `dst`.
    Restore {
        /// Scratch slot read.
        slot: usize,
        /// Sequence written.
        dst: usize,
    },
}

/// The moves that make `new[b] = old[idx[b]]` for every `b`, in the order
/// they must run, and the number of scratch slots they use. Expects every
/// index in `0..idx.len()`.
pub fn moves(idx: &[usize]) -> (Vec<Move>, usize) {
    let n = idx.len();
    debug_assert!(idx.iter().all(|&i| i < n));
    let changes = |b: usize| idx[b] != b;
    // readers[s]: sequences still to be written that read s's old content.
    let mut readers = vec![0usize; n];
    for b in (0..n).filter(|&b| changes(b)) {
        readers[idx[b]] += 1;
    }
    let mut written = vec![false; n];
    let mut saved: Vec<Option<usize>> = vec![None; n];
    let mut out = Vec::new();
    let mut slots = 0;
    let mut ready: Vec<usize> = (0..n).filter(|&b| changes(b) && readers[b] == 0).collect();
    let mut next_unwritten = 0;
    loop {
        while let Some(b) = ready.pop() {
            let src = idx[b];
            out.push(match saved[src] {
                Some(slot) => Move::Restore { slot, dst: b },
                None => Move::Copy { src, dst: b },
            });
            written[b] = true;
            readers[src] -= 1;
            if readers[src] == 0 && changes(src) && !written[src] && saved[src].is_none() {
                ready.push(src);
            }
        }
        // What is left lies on cycles: save one sequence, then write it.
        while next_unwritten < n && (!changes(next_unwritten) || written[next_unwritten]) {
            next_unwritten += 1;
        }
        if next_unwritten == n {
            return (out, slots);
        }
        let c = next_unwritten;
        out.push(Move::Save {
            src: c,
            slot: slots,
        });
        saved[c] = Some(slots);
        slots += 1;
        ready.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `moves` over `old` as the engine would, returning the new contents.
    fn apply(old: &[u32], idx: &[usize]) -> Vec<u32> {
        let (ms, slots) = moves(idx);
        let mut data = old.to_vec();
        let mut scratch = vec![None; slots];
        for m in ms {
            match m {
                Move::Save { src, slot } => scratch[slot] = Some(data[src]),
                Move::Copy { src, dst } => data[dst] = data[src],
                Move::Restore { slot, dst } => data[dst] = scratch[slot].expect("saved before use"),
            }
        }
        data
    }

    fn gather(old: &[u32], idx: &[usize]) -> Vec<u32> {
        idx.iter().map(|&i| old[i]).collect()
    }

    #[test]
    fn identity_moves_nothing() {
        assert_eq!(moves(&[0, 1, 2, 3]), (vec![], 0));
    }

    #[test]
    fn beam_style_repeats_need_no_scratch() {
        let (ms, slots) = moves(&[0, 0, 1, 1]);
        assert_eq!(slots, 0);
        assert_eq!(ms.len(), 3);
        assert_eq!(
            apply(&[10, 11, 12, 13], &[0, 0, 1, 1]),
            vec![10, 10, 11, 11]
        );
    }

    #[test]
    fn a_swap_uses_one_scratch_slot() {
        let (ms, slots) = moves(&[1, 0]);
        assert_eq!(slots, 1);
        assert_eq!(ms.len(), 3);
        assert_eq!(apply(&[5, 6], &[1, 0]), vec![6, 5]);
    }

    #[test]
    fn every_index_vector_up_to_five_gathers_exactly() {
        for n in 1..=5usize {
            let total = n.pow(n as u32);
            for code in 0..total {
                let mut c = code;
                let idx: Vec<usize> = (0..n)
                    .map(|_| {
                        let d = c % n;
                        c /= n;
                        d
                    })
                    .collect();
                let old: Vec<u32> = (0..n as u32).map(|v| 100 + v).collect();
                assert_eq!(apply(&old, &idx), gather(&old, &idx), "idx {idx:?}");
                let (ms, slots) = moves(&idx);
                let changed = idx.iter().enumerate().filter(|(b, &i)| *b != i).count();
                // Each changed sequence is written once; each cycle costs one save.
                assert_eq!(ms.len(), changed + slots, "idx {idx:?}");
            }
        }
    }
}
