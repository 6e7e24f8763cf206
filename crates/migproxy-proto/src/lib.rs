//! The wire protocol between migproxy daemons (see issue: two hosts). Pure encode/decode.
#![forbid(unsafe_code)]
