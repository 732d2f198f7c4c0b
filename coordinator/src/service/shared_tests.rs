//! Tests of `service.rs`.

use super::*;

#[test]
fn an_elastic_job_gives_a_hint_beyond_its_world_size_or_taken_the_highest_free_rank() {
    let mut st = State::fresh(3, 0, None);
    let slot = |pid| Some(Slot { token: "t".into(), pid, hostname: "h".into() });
    // Fixed world size: a hint beyond it is a mistake, named, and so is a taken one.
    let e = pick_rank(&st, Some(3), 3, false).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Elastic: pod 3 of a job that runs at 3 takes the highest free rank, leaving the low
    // ranks to the pods whose index is in range.
    assert_eq!(pick_rank(&st, Some(3), 3, true).unwrap(), 2);
    st.slots[2] = slot(1);
    // A hint inside the world size is the rank it asks for while that rank is free.
    assert_eq!(pick_rank(&st, Some(0), 3, true).unwrap(), 0);
    st.slots[0] = slot(2);
    // Taken: refused in a fixed job; in an elastic one a free rank, so that a pod whose rank
    // another pod took is never locked out of the group.
    assert_eq!(pick_rank(&st, Some(0), 3, false).unwrap_err().code(), tonic::Code::AlreadyExists);
    assert_eq!(pick_rank(&st, Some(0), 3, true).unwrap(), 1);
    // Workers without a hint take the lowest free rank, as before.
    assert_eq!(pick_rank(&st, None, 3, true).unwrap(), 1);
    st.slots[1] = slot(3);
    // No rank free: the worker waits to be admitted (the caller turns this into "admitted at
    // the next checkpoint" when the job runs below MAX).
    for hint in [None, Some(0), Some(3)] {
        assert_eq!(pick_rank(&st, hint, 3, true).unwrap_err().code(), tonic::Code::ResourceExhausted);
    }
}

#[test]
fn after_a_middle_pod_is_lost_the_pods_left_get_ranks_in_either_order() {
    // --workers 2:3 re-formed at 2 after pod 1 was lost: pods 0 and 2 register again.
    for pod_2_first in [true, false] {
        let mut st = State::fresh(2, 1, None);
        let mut ranks = Vec::new();
        let order = if pod_2_first { [2, 0] } else { [0, 2] };
        for pod in order {
            let rank = pick_rank(&st, Some(pod), 2, true).unwrap();
            st.slots[rank] = Some(Slot { token: "t".into(), pid: pod, hostname: "h".into() });
            ranks.push((pod, rank));
        }
        ranks.sort();
        assert_eq!(ranks, vec![(0, 0), (2, 1)], "pod 2 registered first: {pod_2_first}");
    }
}
