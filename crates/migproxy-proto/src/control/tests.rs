use super::*;

fn attribution() -> Attribution {
    Attribution {
        host: Host::Destination,
        leg: Leg::Qemu,
        channel: Some(0),
        direction: Some(Direction::ToDestination),
        op: Op::Write,
        errno: Some("EPIPE".into()),
        message: "broken pipe".into(),
        bytes: Totals {
            to_destination: 512 << 20,
            to_source: 312,
        },
        elapsed_ms: 3400,
    }
}

fn every_message() -> Vec<Control> {
    let bytes = Totals {
        to_destination: u64::MAX,
        to_source: 1,
    };
    let mut no_channel = attribution();
    no_channel.channel = None;
    no_channel.direction = None;
    no_channel.errno = None;
    no_channel.op = Op::Timeout;
    no_channel.leg = Leg::Peer;
    no_channel.host = Host::Source;
    vec![
        Control::Heartbeat,
        Control::ChannelOpened { channel: 7 },
        Control::ChannelClosed {
            channel: 1,
            end: ChannelEnd::Completed,
            bytes,
        },
        Control::ChannelClosed {
            channel: 2,
            end: ChannelEnd::Failed,
            bytes,
        },
        Control::ChannelClosed {
            channel: 2,
            end: ChannelEnd::Cancelled,
            bytes,
        },
        Control::Failed(attribution()),
        Control::Failed(no_channel),
        Control::GaveUp(attribution()),
        Control::Cancel { by: Host::Source },
        Control::Cancel {
            by: Host::Destination,
        },
        Control::Done {
            channels: 5,
            bytes,
            verdict: Verdict::Unknown,
        },
        Control::Done {
            channels: 5,
            bytes,
            verdict: Verdict::Qemu,
        },
        Control::Done {
            channels: 1,
            bytes,
            verdict: Verdict::ReturnPath,
        },
        Control::Progress {
            channel: 0,
            delivered: 0,
            end: None,
        },
        Control::Progress {
            channel: 0,
            delivered: 0,
            end: Some(0),
        },
        Control::Progress {
            channel: u32::MAX,
            delivered: u64::MAX,
            end: Some(u64::MAX - 1),
        },
        Control::Broken {
            channel: 3,
            connection: 2,
        },
        Control::Broken {
            channel: u32::MAX,
            connection: u32::MAX,
        },
        Control::Received { frames: 0 },
        Control::Received { frames: u64::MAX },
        Control::Hurry { channel: 0 },
        Control::Hurry { channel: u32::MAX },
        Control::Parked,
    ]
}

#[test]
fn progress_tells_no_end_from_an_empty_direction() {
    let frame = |end| {
        let mut buf = Vec::new();
        Control::Progress {
            channel: 2,
            delivered: 1 << 33,
            end,
        }
        .encode(&mut buf);
        buf
    };
    let (none, empty) = (frame(None), frame(Some(0)));
    assert_ne!(none, empty);
    // length, type, channel, delivered: then the end, as the Progress hello has it.
    assert_eq!(none.len(), 4 + 1 + 4 + 16);
    assert_eq!(&none[..4], &21u32.to_be_bytes());
    assert_eq!(none[4], 8);
    assert_eq!(&none[5..9], &2u32.to_be_bytes());
    assert_eq!(&none[9..17], &(1u64 << 33).to_be_bytes());
    assert_eq!(&none[17..], &[0xff; 8]);
    assert_eq!(&empty[17..], &[0; 8]);
    for (buf, end) in [(none, None), (empty, Some(0))] {
        let (back, _) = Control::decode_frame(&buf).unwrap();
        assert_eq!(
            back,
            Control::Progress {
                channel: 2,
                delivered: 1 << 33,
                end
            }
        );
    }
    // Not a length a direction can have: it goes as no end.
    let (back, _) = Control::decode_frame(&frame(Some(u64::MAX))).unwrap();
    assert!(matches!(back, Control::Progress { end: None, .. }));
}

#[test]
fn resumable_frames_are_the_same_in_every_version() {
    for message in [
        Control::Progress {
            channel: 1,
            delivered: 7,
            end: Some(9),
        },
        Control::Broken {
            channel: 1,
            connection: 1,
        },
        Control::Hurry { channel: 1 },
    ] {
        let (mut v1, mut v2) = (Vec::new(), Vec::new());
        message.encode_for(1, &mut v1);
        message.encode_for(2, &mut v2);
        assert_eq!(v1, v2);
        let mut current = Vec::new();
        message.encode(&mut current);
        assert_eq!(v2, current);
        assert_eq!(Control::decode_frame(&v1).unwrap().0, message);
    }
}

#[test]
fn a_version_1_peer_gets_a_failure_for_good_as_a_failure() {
    let mut v1 = Vec::new();
    Control::GaveUp(attribution()).encode_for(1, &mut v1);
    let (back, _) = Control::decode_frame(&v1).unwrap();
    assert_eq!(back, Control::Failed(attribution()));
}

#[test]
fn a_version_1_peer_gets_done_without_its_verdict() {
    let bytes = Totals {
        to_destination: 9,
        to_source: 16,
    };
    let done = Control::Done {
        channels: 2,
        bytes,
        verdict: Verdict::ReturnPath,
    };
    let mut v1 = Vec::new();
    done.encode_for(1, &mut v1);
    assert_eq!(v1[4], 6, "type 6, as version 1 knows it");
    let (back, _) = Control::decode_frame(&v1).unwrap();
    assert_eq!(
        back,
        Control::Done {
            channels: 2,
            bytes,
            verdict: Verdict::Unknown
        }
    );
    let mut v2 = Vec::new();
    done.encode_for(2, &mut v2);
    assert_eq!(v2[4], 7);
    assert_eq!(Control::decode_frame(&v2).unwrap().0, done);
    *v2.last_mut().unwrap() = 3;
    assert_eq!(
        Control::decode_frame(&v2),
        Err(DecodeError::InvalidValue {
            field: "verdict",
            value: 3
        })
    );
}

#[test]
fn every_message_round_trips() {
    for message in every_message() {
        let mut buf = Vec::new();
        message.encode(&mut buf);
        assert_eq!(
            Control::decode_frame(&buf),
            Ok((message.clone(), buf.len()))
        );
        for cut in 0..buf.len() {
            assert!(
                matches!(
                    Control::decode_frame(&buf[..cut]),
                    Err(DecodeError::Truncated { .. })
                ),
                "{message:?} cut at {cut}"
            );
        }
    }
}

#[test]
fn frames_decode_back_to_back() {
    let mut buf = Vec::new();
    for message in every_message() {
        message.encode(&mut buf);
    }
    let mut at = 0;
    let mut decoded = Vec::new();
    while at < buf.len() {
        let (message, used) = Control::decode_frame(&buf[at..]).unwrap();
        decoded.push(message);
        at += used;
    }
    assert_eq!(decoded, every_message());
}

#[test]
fn long_messages_are_cut_to_the_limit() {
    let mut long = attribution();
    long.message = "x".repeat(100_000);
    let mut buf = Vec::new();
    Control::Failed(long).encode(&mut buf);
    let (Control::Failed(back), _) = Control::decode_frame(&buf).unwrap() else {
        panic!("not a failure")
    };
    assert_eq!(back.message.len(), MAX_MESSAGE);
    assert!(buf.len() <= MAX_CONTROL_FRAME);
}

#[test]
fn rejects_each_defect_distinctly() {
    assert!(matches!(
        frame_len(u32::MAX.to_be_bytes()),
        Err(DecodeError::Oversized { .. })
    ));
    assert_eq!(Control::decode(&[99]), Err(DecodeError::UnknownMessage(99)));
    assert_eq!(Control::decode(&[1, 0]), Err(DecodeError::TrailingBytes(1)));
    assert_eq!(Control::decode(&[14]), Err(DecodeError::UnknownMessage(14)));
    assert_eq!(
        Control::decode(&[13, 0]),
        Err(DecodeError::TrailingBytes(1))
    );
    assert!(matches!(
        Control::decode(&[11, 0]),
        Err(DecodeError::Truncated { .. })
    ));
    assert!(matches!(
        Control::decode(&[10, 0, 0]),
        Err(DecodeError::Truncated { .. })
    ));
    assert_eq!(
        Control::decode(&[9, 0, 0, 0, 1, 0, 0, 0, 2, 0]),
        Err(DecodeError::TrailingBytes(1))
    );
    // Type, channel, then the 16 bytes of progress: one more is too many, 12 too few.
    let progress = [[8, 0, 0, 0, 1].as_slice(), &[0; 16]].concat();
    assert!(Control::decode(&progress).is_ok());
    assert_eq!(
        Control::decode(&[progress.as_slice(), &[0]].concat()),
        Err(DecodeError::TrailingBytes(1))
    );
    assert_eq!(
        Control::decode(&progress[..progress.len() - 4]),
        Err(DecodeError::Truncated { needed: 4 })
    );
    assert_eq!(
        Control::decode(&[5, 9]),
        Err(DecodeError::InvalidValue {
            field: "host",
            value: 9
        })
    );
    let mut buf = Vec::new();
    Control::Failed(attribution()).encode(&mut buf);
    buf[4 + 1 + 8] = 42; // length, type, host, leg, channel flag and index, direction: op
    assert!(matches!(
        Control::decode_frame(&buf),
        Err(DecodeError::InvalidValue {
            field: "op",
            value: 42
        })
    ));
}
