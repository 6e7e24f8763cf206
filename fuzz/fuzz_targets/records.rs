//! migproxy's TLS record opener and what reads the opened content (alerts, handshake
//! messages, KeyUpdate), with known keys: the input is a script for the sending side
//! (`migproxy::tls::fuzzing`), and the receiving side must never panic, open exactly the
//! records sealed for it, hand out exactly their content, and follow key updates.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = migproxy::tls::fuzzing::records(data);
});
