//! Tests of `service.rs`.

use super::*;

#[test]
fn an_elastic_job_gives_a_hint_beyond_its_world_size_a_free_rank() {
    let mut st = State::fresh(2, 0, None);
    // Fixed world size: a hint beyond it is a mistake, named.
    let e = pick_rank(&st, Some(3), 2, false).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Elastic: pod 3 of a job that runs at 2 takes the lowest free rank.
    assert_eq!(pick_rank(&st, Some(3), 2, true).unwrap(), 0);
    st.slots[0] = Some(Slot { token: "t".into(), pid: 1, hostname: "h".into() });
    assert_eq!(pick_rank(&st, Some(3), 2, true).unwrap(), 1);
    // A hint inside the world size is still the rank it asks for, or taken.
    assert_eq!(pick_rank(&st, Some(0), 2, true).unwrap_err().code(), tonic::Code::AlreadyExists);
    st.slots[1] = Some(Slot { token: "u".into(), pid: 2, hostname: "h".into() });
    assert_eq!(pick_rank(&st, Some(3), 2, true).unwrap_err().code(), tonic::Code::ResourceExhausted);
}
