//! TCP ring all-reduce: see the ring helper's brief.
