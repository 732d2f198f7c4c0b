//! What each rank sends and receives at each step of a ring collective, as element ranges
//! of the flat buffer, plus the two ordering rules that let the transfer loop pipeline the
//! steps chunk by chunk without ever sending a value before it is final for that step.

use std::ops::Range;

/// What to do with the received values of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Combine {
    /// `local = local + received` (reduce-scatter).
    Add,
    /// `local = (local + received) / divisor`: the last reduce-scatter step, on the rank that
    /// ends up owning the segment's sum, so the mean is computed once and then only copied.
    AddThenDivide(f32),
    /// `local = received` (all-gather, broadcast).
    Copy,
}

/// One step of a ring collective on one rank.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    /// Elements sent to the next rank (may be empty).
    pub send: Range<usize>,
    /// Elements received from the previous rank (may be empty).
    pub recv: Range<usize>,
    pub combine: Combine,
    /// Element `i` of `send` may go out only once the receive of that step (whose range is
    /// the same) has processed element `i`: we forward what we just reduced or received.
    pub send_after_recv_of: Option<usize>,
    /// Element `i` of `recv` may be overwritten only once the send of that step (whose range
    /// is the same) has written element `i` to the socket: all-gather overwrites a segment
    /// that reduce-scatter sent earlier.
    pub recv_after_send_of: Option<usize>,
}

/// Segment `k` of `len` elements split into `world` near-equal parts. Works for any `len`,
/// including `len < world` (some segments are then empty) and 0.
pub(crate) fn segment(len: usize, world: usize, k: usize) -> Range<usize> {
    let bound = |i: usize| ((i as u128 * len as u128) / world as u128) as usize;
    bound(k)..bound(k + 1)
}

/// Bandwidth-optimal ring all-reduce (mean): `world - 1` reduce-scatter steps, then
/// `world - 1` all-gather steps. With segments indexed mod `world`, rank `r` sends segment
/// `r - s` and adds segment `r - s - 1` at reduce-scatter step `s`, so segment `k` is summed
/// along the ring starting at rank `k`: `(((x_k + x_{k+1}) + x_{k+2}) + ...)`, and rank
/// `k - 1` divides it by `world`. The all-gather then only copies those bits around.
pub(crate) fn all_reduce_steps(len: usize, world: usize, rank: usize) -> Vec<Step> {
    if world < 2 {
        return Vec::new();
    }
    let seg = |offset: isize| {
        let k = (rank as isize + offset).rem_euclid(world as isize) as usize;
        segment(len, world, k)
    };
    let mut steps = Vec::with_capacity(2 * (world - 1));
    for s in 0..world - 1 {
        let s_i = s as isize;
        steps.push(Step {
            send: seg(-s_i),
            recv: seg(-s_i - 1),
            combine: if s == world - 2 { Combine::AddThenDivide(world as f32) } else { Combine::Add },
            send_after_recv_of: s.checked_sub(1),
            recv_after_send_of: None,
        });
    }
    for s in 0..world - 1 {
        let s_i = s as isize;
        let t = world - 1 + s;
        steps.push(Step {
            send: seg(1 - s_i),
            recv: seg(-s_i),
            combine: Combine::Copy,
            send_after_recv_of: Some(t - 1),
            recv_after_send_of: Some(s),
        });
    }
    steps
}

/// Pipelined ring broadcast: the root sends the whole buffer to the next rank, every other
/// rank forwards each chunk as soon as it has it, and the rank before the root only receives.
pub(crate) fn broadcast_steps(len: usize, world: usize, rank: usize, root: usize) -> Vec<Step> {
    if world < 2 {
        return Vec::new();
    }
    let position = (rank + world - root) % world;
    let step = if position == 0 {
        Step {
            send: 0..len,
            recv: 0..0,
            combine: Combine::Copy,
            send_after_recv_of: None,
            recv_after_send_of: None,
        }
    } else if position == world - 1 {
        Step {
            send: 0..0,
            recv: 0..len,
            combine: Combine::Copy,
            send_after_recv_of: None,
            recv_after_send_of: None,
        }
    } else {
        Step {
            send: 0..len,
            recv: 0..len,
            combine: Combine::Copy,
            send_after_recv_of: Some(0),
            recv_after_send_of: None,
        }
    };
    vec![step]
}

/// The exact result of the ring all-reduce-mean of `inputs` (one buffer per rank, in rank
/// order), computed in one process with the same summation order as the ring.
pub(crate) fn reference_mean(inputs: &[&[f32]]) -> Vec<f32> {
    let world = inputs.len();
    let Some(first) = inputs.first() else {
        return Vec::new();
    };
    let len = first.len();
    let mut out = vec![0.0f32; len];
    for k in 0..world {
        for i in segment(len, world, k) {
            let mut sum = inputs[k][i];
            for j in 1..world {
                sum += inputs[(k + j) % world][i];
            }
            // Division by 1 is exact, so world size 1 needs no special case.
            out[i] = sum / world as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_buffer_in_order_without_overlap() {
        for world in 1..=9 {
            for len in [0usize, 1, 2, 5, 7, 8, 9, 1000, 4099] {
                let mut next = 0;
                for k in 0..world {
                    let r = segment(len, world, k);
                    assert_eq!(r.start, next, "len {len} world {world} k {k}");
                    assert!(r.len() <= len / world + 1);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    /// Every rank must end with each element written exactly as the owner computed it; this
    /// checks the bookkeeping the transfer loop relies on: the ranges named by the ordering
    /// rules are the same ranges, and each rank's sends match the next rank's receives.
    #[test]
    fn all_reduce_steps_are_consistent_between_neighbours() {
        for world in 2..=8 {
            for len in [0usize, 1, 7, 1000, 4099] {
                let plans: Vec<Vec<Step>> = (0..world).map(|r| all_reduce_steps(len, world, r)).collect();
                for (rank, steps) in plans.iter().enumerate() {
                    assert_eq!(steps.len(), 2 * (world - 1));
                    let next = &plans[(rank + 1) % world];
                    for (t, step) in steps.iter().enumerate() {
                        assert_eq!(step.send, next[t].recv, "world {world} rank {rank} t {t}");
                        if let Some(u) = step.send_after_recv_of {
                            assert!(u < t || (u == t && step.recv == step.send));
                            assert_eq!(steps[u].recv, step.send);
                        }
                        if let Some(u) = step.recv_after_send_of {
                            assert!(u < t);
                            assert_eq!(steps[u].send, step.recv);
                        }
                    }
                    // The segment this rank divides is the one it sends first in all-gather.
                    let last_rs = &steps[world - 2];
                    assert_eq!(last_rs.combine, Combine::AddThenDivide(world as f32));
                    assert_eq!(last_rs.recv, steps[world - 1].send);
                }
            }
        }
    }

    #[test]
    fn broadcast_steps_forward_around_the_ring_once() {
        for world in 2..=6 {
            for root in 0..world {
                let plans: Vec<Vec<Step>> = (0..world).map(|r| broadcast_steps(10, world, r, root)).collect();
                for rank in 0..world {
                    let next = (rank + 1) % world;
                    assert_eq!(plans[rank][0].send, plans[next][0].recv);
                }
                assert!(plans[root][0].recv.is_empty());
                assert!(plans[(root + world - 1) % world][0].send.is_empty());
            }
        }
    }

    #[test]
    fn reference_mean_sums_each_segment_starting_at_its_owner() {
        // 1e8 + 1 - 1e8 depends on the order in f32: this pins the documented order.
        let a = [1.0e8f32, -1.0e8];
        let b = [-1.0e8f32, 1.0];
        let c = [1.0f32, 1.0e8];
        let got = reference_mean(&[&a, &b, &c]);
        // len 2, world 3: segment 0 is empty, segment 1 = [0], segment 2 = [1].
        let ring0 = ((b[0] + c[0]) + a[0]) / 3.0;
        let ring1 = ((c[1] + a[1]) + b[1]) / 3.0;
        assert_eq!(got[0].to_bits(), ring0.to_bits());
        assert_eq!(got[1].to_bits(), ring1.to_bits());
        // The naive order gives other bits here, so the assertions above do pin the order.
        assert_ne!(((a[0] + b[0]) + c[0]) / 3.0, ring0);
        assert_ne!(((a[1] + b[1]) + c[1]) / 3.0, ring1);
        assert_eq!(reference_mean(&[&[2.5f32, -1.0]]), vec![2.5, -1.0]);
    }
}
