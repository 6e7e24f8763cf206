//! Every decoder on arbitrary bytes: no panic, and whatever decodes re-encodes to a value
//! that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migproxy_proto::{Control, Hello, HelloReply};

fuzz_target!(|data: &[u8]| {
    if let Ok(hello) = Hello::decode(data) {
        let mut buf = Vec::new();
        hello.encode(&mut buf);
        assert_eq!(Hello::decode(&buf), Ok(hello));
    }
    if let Ok(reply) = HelloReply::decode(data) {
        let mut buf = Vec::new();
        reply.encode(&mut buf);
        assert_eq!(HelloReply::decode(&buf), Ok(reply));
    }
    let mut at = 0;
    while let Ok((message, used)) = Control::decode_frame(&data[at..]) {
        let mut buf = Vec::new();
        message.encode(&mut buf);
        assert_eq!(Control::decode_frame(&buf), Ok((message, buf.len())));
        at += used;
    }
});
