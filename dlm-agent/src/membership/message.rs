//! The agreement's messages as they travel in the CPG group: a fixed
//! layout, little-endian, checked whole on the way in (the group's other
//! members are trusted only as far as corosync's own authentication goes).
//!
//! ```text
//!  "DLMv" version(2) kind(1: round, 2: report) by.nodeid(u32) by.pid(u32) seq(u64) [epoch(u64) incarnation(u64) quorate(u8: 0 or 1)]
//!  "DLMv" version(1) kind(3: fenced) nodeid(u32)
//! ```

use dlm_core::cluster::agree::{CpgMember, Message, RoundId};

const MAGIC: &[u8; 4] = b"DLMv";
const VERSION: u8 = 2;
const KIND_ROUND: u8 = 1;
const KIND_REPORT: u8 = 2;
const KIND_FENCED: u8 = 3;
const FENCED_LEN: usize = 4 + 1 + 1 + 4;
/// Magic, version, kind and the round's id.
const HEAD_LEN: usize = 4 + 1 + 1 + 4 + 4 + 8;
const REPORT_LEN: usize = HEAD_LEN + 8 + 8 + 1;

/// The bytes of `message`.
#[must_use]
pub fn encode(message: &Message) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(REPORT_LEN);
    bytes.extend_from_slice(MAGIC);
    let (kind, round) = match message {
        Message::Round(round) => (KIND_ROUND, round),
        Message::Report { round, .. } => (KIND_REPORT, round),
        Message::Fenced { nodeid } => {
            bytes.extend_from_slice(&[VERSION, KIND_FENCED]);
            bytes.extend_from_slice(&nodeid.to_le_bytes());
            return bytes;
        }
    };
    bytes.extend_from_slice(&[VERSION, kind]);
    bytes.extend_from_slice(&round.by.nodeid.to_le_bytes());
    bytes.extend_from_slice(&round.by.pid.to_le_bytes());
    bytes.extend_from_slice(&round.seq.to_le_bytes());
    if let Message::Report { epoch, incarnation, quorate, .. } = message {
        bytes.extend_from_slice(&epoch.to_le_bytes());
        bytes.extend_from_slice(&incarnation.to_le_bytes());
        bytes.push(u8::from(*quorate));
    }
    bytes
}

/// The message in `bytes`, if they hold exactly one of this version.
#[must_use]
pub fn decode(bytes: &[u8]) -> Option<Message> {
    if bytes.len() < FENCED_LEN || &bytes[..4] != MAGIC || bytes[4] != VERSION {
        return None;
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    if bytes[5] == KIND_FENCED {
        return (bytes.len() == FENCED_LEN).then(|| Message::Fenced { nodeid: u32_at(6) });
    }
    if bytes.len() < HEAD_LEN {
        return None;
    }
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let round = RoundId { by: CpgMember { nodeid: u32_at(6), pid: u32_at(10) }, seq: u64_at(14) };
    match (bytes[5], bytes.len()) {
        (KIND_ROUND, HEAD_LEN) => Some(Message::Round(round)),
        (KIND_REPORT, REPORT_LEN) => {
            let quorate = match bytes[HEAD_LEN + 16] {
                0 => false,
                1 => true,
                _ => return None,
            };
            Some(Message::Report { round, epoch: u64_at(HEAD_LEN), incarnation: u64_at(HEAD_LEN + 8), quorate })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_back_as_sent_and_anything_else_is_refused() {
        let round = RoundId { by: CpgMember { nodeid: 3, pid: 4242 }, seq: 7 };
        let messages = [
            Message::Round(round),
            Message::Report { round, epoch: 12, incarnation: u64::MAX - 1, quorate: true },
            Message::Fenced { nodeid: 9 },
        ];
        for message in messages {
            let bytes = encode(&message);
            assert_eq!(decode(&bytes), Some(message));
            for len in 0..bytes.len() {
                assert_eq!(decode(&bytes[..len]), None, "{message:?} cut to {len} bytes");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(decode(&longer), None);
            for at in [0, 4, 5] {
                let mut bad = bytes.clone();
                bad[at] ^= 0x40;
                assert_eq!(decode(&bad), None, "byte {at} changed");
            }
        }
        let mut report = encode(&Message::Report { round, epoch: 1, incarnation: 1, quorate: false });
        *report.last_mut().expect("not empty") = 2;
        assert_eq!(decode(&report), None, "a quorate flag is 0 or 1");
    }
}
