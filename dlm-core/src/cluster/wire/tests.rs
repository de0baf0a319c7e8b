use std::time::Duration;

use super::*;
use crate::cluster::message::{Envelope, NodeId, PeerMessage, RecoveredLock, RemoteEdge};
use crate::cluster::pressure::NodePressure;
use crate::deadlock::{Blocker, WaitRef};
use crate::effect::{Completion, Op, Status};
use crate::flags::{LockFlags, StatusFlags, UnlockFlags};
use crate::ids::{FencingToken, LockHandle, LockspaceId, SessionId};
use crate::mode::{Mode, ModeSet};

fn samples() -> Vec<PeerMessage> {
    let (session, handle) = (NodeId(2).session(7), LockHandle(9));
    vec![
        PeerMessage::Lookup { lockspace: b"ls".to_vec(), name: b"r".to_vec(), stale: Some((NodeId(3), 4)) },
        PeerMessage::LookupReply {
            lockspace: b"ls".to_vec(),
            name: vec![0, 255],
            master: Some(NodeId(1)),
            term: 5,
            token_floor: 99,
        },
        PeerMessage::Remove { lockspace: b"ls".to_vec(), name: b"r".to_vec(), term: 5, token_floor: 7 },
        PeerMessage::Request {
            lockspace: b"ls".to_vec(),
            session,
            handle,
            name: b"r".to_vec(),
            mode: Mode::Ex,
            flags: LockFlags::NOQUEUE | LockFlags::VALBLK,
            timeout: Some(Duration::from_millis(3)),
        },
        PeerMessage::Convert {
            session,
            handle,
            mode: Mode::Pr,
            flags: LockFlags::VALBLK,
            lvb: Some(vec![1; 32]),
            timeout: None,
        },
        PeerMessage::Unlock { session, handle, flags: UnlockFlags::FORCE, lvb: None },
        PeerMessage::Cancel { session, handle },
        PeerMessage::NotMaster { session, handle },
        PeerMessage::Complete(Completion {
            session,
            handle,
            op: Op::Convert,
            status: Status::Rejected,
            mode: Some(Mode::Cw),
            token: Some(FencingToken(12)),
            lvb: Some(vec![7; 8]),
            flags: StatusFlags::VALNOTVALID,
        }),
        PeerMessage::Blocking { session, handle, mode: Mode::Pw },
        PeerMessage::EndSession { session },
        PeerMessage::WaitEdges { edges: vec![remote_edge(session)] },
        PeerMessage::ConfirmEdges { probe: u64::MAX, edges: vec![remote_edge(session), remote_edge(SessionId(4))] },
        PeerMessage::EdgesConfirmed { probe: 9, confirmed: true },
        PeerMessage::EdgesConfirmed { probe: 10, confirmed: false },
        PeerMessage::AbortWait { wait: WaitRef { lockspace: LockspaceId(1), lock: 2, seq: 3 } },
        PeerMessage::RecoverLock(RecoveredLock {
            lockspace: b"ls".to_vec(),
            name: b"r".to_vec(),
            session,
            handle,
            mode: Mode::Pw,
            token: 77,
            flags: LockFlags::EMPTY,
            lvb: Some(vec![1; 4]),
            unlocking: false,
            lvb_unsure: true,
            or_modes: ModeSet::of(&[Mode::Pr]),
            direct: false,
        }),
        PeerMessage::RecoverLock(RecoveredLock {
            lockspace: b"ls".to_vec(),
            name: b"q".to_vec(),
            session,
            handle,
            mode: Mode::Nl,
            token: 1,
            flags: LockFlags::PERSISTENT,
            lvb: None,
            unlocking: true,
            lvb_unsure: false,
            or_modes: ModeSet::EMPTY,
            direct: true,
        }),
        PeerMessage::RecoverDigest { locks: 3, digest: u128::MAX - 7 },
        PeerMessage::RecoverDigest { locks: 0, digest: 0 },
        PeerMessage::RecoverListed,
        PeerMessage::RecoverChecked { matched: true },
        PeerMessage::RecoverChecked { matched: false },
        PeerMessage::RecoverRefused { lockspace: b"ls".to_vec(), name: b"r".to_vec() },
        PeerMessage::Heartbeat,
        PeerMessage::Pressure(NodePressure { memory_some: 1000, memory_full: 312, cpu_some: 0 }),
    ]
}

fn remote_edge(from: SessionId) -> RemoteEdge {
    RemoteEdge {
        from,
        to: SessionId(3),
        wait: WaitRef { lockspace: LockspaceId(1), lock: 2, seq: 3 },
        blocker: Blocker { lock: 5, token: crate::cluster::TOKEN_LIMIT - 1, seq: 6 },
    }
}

fn frames(envelopes: &[Envelope]) -> Vec<Envelope> {
    let mut bytes = Vec::new();
    encode_frames(envelopes, &mut bytes);
    let mut decoded = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let len = frame_len(rest[..4].try_into().unwrap()).unwrap();
        decoded.extend(decode_frame(&rest[4..4 + len]).unwrap());
        rest = &rest[4 + len..];
    }
    decoded
}

#[test]
fn every_message_round_trips() {
    let envelopes: Vec<Envelope> = samples()
        .into_iter()
        .enumerate()
        .map(|(i, m)| Envelope { epoch: 1, seq: i as u64 + 1, ack: 4, message: Some(m) })
        .chain([Envelope { epoch: 1, seq: 0, ack: 9, message: None }])
        .collect();
    assert_eq!(frames(&envelopes), envelopes);
}

#[test]
fn many_envelopes_split_into_bounded_frames() {
    let envelope =
        Envelope { epoch: 1, seq: 1, ack: 0, message: Some(PeerMessage::EndSession { session: SessionId(1) }) };
    let envelopes = vec![envelope; FRAME_ENVELOPES_MAX * 2 + 3];
    assert_eq!(frames(&envelopes).len(), envelopes.len());
}

#[test]
fn hello_round_trips_and_bad_ones_are_refused() {
    let hello = Hello { version: VERSION, cluster: b"prod".to_vec(), node: NodeId(4), epoch: 2, incarnation: 99 };
    let bytes = encode_hello(&hello);
    assert_eq!(hello_len(bytes[..7].try_into().unwrap()), Ok(bytes.len()));
    assert_eq!(decode_hello(&bytes), Ok(hello));
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert_eq!(decode_hello(&bad), Err(WireError::BadMagic));
    assert!(matches!(hello_len(&[b'D', b'L', b'M', b'P', 0, 1, 200]), Err(WireError::TooLong { .. })));
}

#[test]
fn malformed_frames_are_refused() {
    assert!(matches!(frame_len((FRAME_LEN_MAX as u32 + 1).to_be_bytes()), Err(WireError::TooLong { .. })));
    // An unknown tag.
    let mut body = vec![0, 1];
    body.extend_from_slice(&[0; 24]);
    body.extend_from_slice(&[1, 99]);
    assert_eq!(decode_frame(&body), Err(WireError::Invalid("message tag")));
    // A resource name over 64 bytes.
    let mut body = vec![0, 1];
    body.extend_from_slice(&[0; 24]);
    body.extend_from_slice(&[1, 1, 2, b'l', b's', 65]);
    body.extend_from_slice(&[b'x'; 65]);
    body.push(0);
    assert!(matches!(decode_frame(&body), Err(WireError::TooLong { what: "resource name", .. })));
    // A huge edge count with no bytes behind it allocates nothing.
    let mut body = vec![0, 1];
    body.extend_from_slice(&[0; 24]);
    body.extend_from_slice(&[1, 12, 0, 0, 0x3f, 0xff]);
    assert_eq!(decode_frame(&body), Err(WireError::Truncated));
    // A pressure over the whole time.
    let mut body = vec![0, 1];
    body.extend_from_slice(&[0; 24]);
    body.extend_from_slice(&[1, 24, 0, 0, 0x03, 0xe9, 0, 0]);
    assert_eq!(decode_frame(&body), Err(WireError::Invalid("pressure over 1000 per mille")));
    // Trailing bytes.
    let mut bytes = Vec::new();
    encode_frames(&[Envelope { epoch: 1, seq: 0, ack: 0, message: None }], &mut bytes);
    bytes.push(0);
    assert_eq!(decode_frame(&bytes[4..]), Err(WireError::Trailing(1)));
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = crate::sim::Rng::new(7);
    for _ in 0..20_000 {
        let len = rng.below(200) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let _ = decode_frame(&bytes);
        let _ = decode_hello(&bytes);
    }
    // And valid frames with single bytes flipped.
    let mut good = Vec::new();
    let envelopes: Vec<Envelope> =
        samples().into_iter().map(|m| Envelope { epoch: 1, seq: 1, ack: 0, message: Some(m) }).collect();
    encode_frames(&envelopes, &mut good);
    for i in 4..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0xff;
        let _ = decode_frame(&bad[4..]);
    }
}

#[test]
fn tokens_and_floors_beyond_the_token_space_are_refused() {
    use crate::cluster::TOKEN_LIMIT;
    let remove =
        |token_floor| PeerMessage::Remove { lockspace: b"ls".to_vec(), name: b"r".to_vec(), term: 5, token_floor };
    let decode = |message: PeerMessage| {
        let mut bytes = Vec::new();
        encode_frames(&[Envelope { epoch: 1, seq: 1, ack: 0, message: Some(message) }], &mut bytes);
        decode_frame(&bytes[4..])
    };
    assert!(decode(remove(TOKEN_LIMIT - 1)).is_ok());
    // The forged floor that made tokens wrap to 0 (issue 17), and the limit itself.
    for floor in [u64::MAX - 2, TOKEN_LIMIT] {
        assert_eq!(decode(remove(floor)), Err(WireError::Invalid("fencing token beyond the token space")), "{floor}");
    }
    // Every other place a peer gives a token is checked the same way.
    for message in samples() {
        let mut forged = message.clone();
        let touched = match &mut forged {
            PeerMessage::LookupReply { token_floor, .. } => {
                *token_floor = u64::MAX;
                true
            }
            PeerMessage::Complete(completion) if completion.token.is_some() => {
                completion.token = Some(crate::FencingToken(u64::MAX));
                true
            }
            PeerMessage::RecoverLock(lock) => {
                lock.token = u64::MAX;
                true
            }
            PeerMessage::WaitEdges { edges } => {
                edges[0].blocker.token = u64::MAX;
                true
            }
            _ => false,
        };
        if touched {
            assert!(decode(forged).is_err(), "{message:?} with a token at 2^64-1 was taken");
        }
    }
    assert!(crate::cluster::epoch_token_floor(u64::MAX) < TOKEN_LIMIT);
}
