//! NTLM (NTLMv2 responses only, per MS-NLMP) for Exchange relays that do not do Kerberos from
//! this host. The password comes from a stored credential; `DOMAIN\user` names the domain.

use hmac::{Hmac, KeyInit, Mac};
use md4::{Digest, Md4};
use md5::Md5;
use zeroize::Zeroizing;

const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";
const UNICODE: u32 = 0x0000_0001;
const REQUEST_TARGET: u32 = 0x0000_0004;
const NTLM: u32 = 0x0000_0200;
const ALWAYS_SIGN: u32 = 0x0000_8000;
const EXTENDED_SESSION_SECURITY: u32 = 0x0008_0000;
const FLAGS: u32 = UNICODE | REQUEST_TARGET | NTLM | ALWAYS_SIGN | EXTENDED_SESSION_SECURITY;

/// Splits `DOMAIN\user` (or `user@domain` is kept whole, as Windows accepts UPNs).
pub fn split_user(username: &str) -> (&str, &str) {
    match username.split_once('\\') {
        Some((domain, user)) => (domain, user),
        None => ("", username),
    }
}

/// The NEGOTIATE message.
pub fn negotiate() -> Vec<u8> {
    let mut m = Vec::with_capacity(32);
    m.extend_from_slice(SIGNATURE);
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&FLAGS.to_le_bytes());
    m.extend_from_slice(&[0; 16]); // empty domain and workstation
    m
}

/// What the relay's CHALLENGE message carries.
pub struct Challenge {
    pub server_challenge: [u8; 8],
    pub target_info: Vec<u8>,
}

pub fn parse_challenge(m: &[u8]) -> Result<Challenge, String> {
    if m.len() < 32 || &m[..8] != SIGNATURE || m[8..12] != 2u32.to_le_bytes() {
        return Err("the relay's NTLM challenge is not an NTLMSSP CHALLENGE message".into());
    }
    let mut server_challenge = [0; 8];
    server_challenge.copy_from_slice(&m[24..32]);
    let target_info = if m.len() >= 48 {
        let len = u16::from_le_bytes([m[40], m[41]]) as usize;
        let offset = u32::from_le_bytes([m[44], m[45], m[46], m[47]]) as usize;
        m.get(offset..offset + len).map(<[u8]>::to_vec).unwrap_or_default()
    } else {
        Vec::new()
    };
    Ok(Challenge { server_challenge, target_info })
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut mac = <Hmac<Md5> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The AUTHENTICATE message with NTLMv2 and LMv2 responses. `client_nonce` and `timestamp`
/// (100 ns since 1601) come from the caller, so the computation is testable.
pub fn authenticate(
    username: &str,
    password: &str,
    workstation: &str,
    challenge: &Challenge,
    client_nonce: [u8; 8],
    timestamp: u64,
) -> Zeroizing<Vec<u8>> {
    let (domain, user) = split_user(username);
    let nt_hash = Zeroizing::new(Md4::digest(utf16(password)).to_vec());
    let v2_hash = Zeroizing::new(hmac_md5(&nt_hash, &[&utf16(&(user.to_uppercase() + domain))]));
    let mut blob = vec![1, 1, 0, 0, 0, 0, 0, 0];
    blob.extend_from_slice(&timestamp.to_le_bytes());
    blob.extend_from_slice(&client_nonce);
    blob.extend_from_slice(&[0; 4]);
    blob.extend_from_slice(&challenge.target_info);
    blob.extend_from_slice(&[0; 4]);
    let proof = hmac_md5(&*v2_hash, &[&challenge.server_challenge, &blob]);
    let nt_response = [&proof[..], &blob].concat();
    let lm_response = [&hmac_md5(&*v2_hash, &[&challenge.server_challenge, &client_nonce])[..], &client_nonce].concat();

    let fields = [lm_response, nt_response, utf16(domain), utf16(user), utf16(workstation), Vec::new()];
    let header = 64;
    let mut m = Zeroizing::new(Vec::with_capacity(header + fields.iter().map(Vec::len).sum::<usize>()));
    m.extend_from_slice(SIGNATURE);
    m.extend_from_slice(&3u32.to_le_bytes());
    let mut offset = header;
    for f in &fields {
        m.extend_from_slice(&(f.len() as u16).to_le_bytes());
        m.extend_from_slice(&(f.len() as u16).to_le_bytes());
        m.extend_from_slice(&(offset as u32).to_le_bytes());
        offset += f.len();
    }
    m.extend_from_slice(&FLAGS.to_le_bytes());
    for f in &fields {
        m.extend_from_slice(f);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    // MS-NLMP 4.2.4 test vectors (NTLMv2): User "User", domain "Domain", password "Password".
    #[test]
    fn ntlmv2_response_matches_the_specification() {
        let challenge = Challenge {
            server_challenge: [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef],
            target_info: hex_bytes("02000c0044006f006d00610069006e0001000c0053006500720076006500720000000000"),
        };
        let m = authenticate("Domain\\User", "Password", "COMPUTER", &challenge, [0xaa; 8], 0);
        // NTProofStr from the specification (4.2.4.2.2).
        let nt_offset = u32::from_le_bytes([m[24], m[25], m[26], m[27]]) as usize;
        assert_eq!(&m[nt_offset..nt_offset + 16], &hex_bytes("68cd0ab851e51c96aabc927bebef6a1c")[..]);
        // LMv2 response (4.2.4.2.1).
        let lm_offset = u32::from_le_bytes([m[16], m[17], m[18], m[19]]) as usize;
        assert_eq!(&m[lm_offset..lm_offset + 24], &hex_bytes("86c35097ac9cec102554764a57cccc19aaaaaaaaaaaaaaaa")[..]);
    }

    #[test]
    fn challenge_parsing_refuses_other_messages() {
        assert!(parse_challenge(&negotiate()).is_err());
        assert!(parse_challenge(b"short").is_err());
        assert_eq!(split_user("CORP\\panel"), ("CORP", "panel"));
        assert_eq!(split_user("panel"), ("", "panel"));
    }

    fn hex_bytes(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }
}
