//! The ring's handshake and op header (`trainer_proto::ring_wire`), as a stranger or a broken
//! peer sends them: every parser returns a message or a refusal, never asks for a byte more
//! than its format's bounds, and a complete message is exactly the bytes it used.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trainer_proto::ring_wire::{self as wire, Hello, OpHeader, Reply};

fuzz_target!(|data: &[u8]| {
    let hello_limit = wire::HELLO_FIXED_LEN + wire::MAX_TOKEN_LEN;
    match wire::parse_stream(data, hello_limit, wire::parse_hello) {
        Err(broken) => panic!("parse_hello broke its contract: {broken}"),
        Ok(Some((Ok(hello), used))) => assert_eq!(Hello::encode(&hello), data[..used]),
        Ok(_) => {}
    }
    let reply_limit = wire::REPLY_FIXED_LEN + wire::MAX_MESSAGE_LEN;
    match wire::parse_stream(data, reply_limit, wire::parse_reply) {
        Err(broken) => panic!("parse_reply broke its contract: {broken}"),
        Ok(Some((Ok(Reply::Refused(why)), used))) => assert!(why.len() <= 3 * (used - wire::REPLY_FIXED_LEN)),
        Ok(_) => {}
    }
    if let Ok(header) = OpHeader::parse(&data[..data.len().min(wire::HEADER_LEN)]) {
        assert_eq!(OpHeader::parse(&header.encode()), Ok(header));
    }
});
