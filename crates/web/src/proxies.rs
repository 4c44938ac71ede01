//! Trusted reverse proxies: behind one, every request comes from the proxy's address, so the
//! client is the address the proxy put in `X-Forwarded-For`. Only a configured proxy is
//! believed; anyone else could write that header.

use std::net::IpAddr;

/// An address or network a trusted proxy connects from: `10.0.0.5`, `10.0.0.0/8`, `::1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (addr, bits) = match text.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (text, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{text}' is not an address or network (e.g. 10.0.0.5, 10.0.0.0/8, ::1)"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("'{text}': the prefix length must be 0-{max}"))?,
        };
        Ok(Cidr { net: net.to_canonical(), bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let prefix = |bytes: &[u8], other: &[u8]| {
            let (whole, rest) = (usize::from(self.bits / 8), self.bits % 8);
            bytes[..whole] == other[..whole] && (rest == 0 || (bytes[whole] ^ other[whole]) & (0xff << (8 - rest)) == 0)
        };
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(i)) => prefix(&n.octets(), &i.octets()),
            (IpAddr::V6(n), IpAddr::V6(i)) => prefix(&n.octets(), &i.octets()),
            _ => false,
        }
    }
}

/// The client's address: the peer itself unless it is a trusted proxy; then, walking
/// `X-Forwarded-For` from the right (each proxy appends the address it saw), the first address
/// that is not a trusted proxy. A malformed or missing header leaves the peer.
pub fn client_address(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let Some(header) = forwarded_for else { return peer };
    let mut client = peer;
    for hop in header.rsplit(',').take(32) {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip.to_canonical();
                if !is_trusted(client) {
                    return client;
                }
            }
            Err(_) => return client,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_contain_their_addresses_only() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains(ip("10.1.200.3")) && !net.contains(ip("10.2.0.1")));
        assert!(Cidr::parse("10.0.0.5").unwrap().contains(ip("::ffff:10.0.0.5")), "IPv4-mapped");
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(!Cidr::parse("fd00::/8").unwrap().contains(ip("10.0.0.1")));
        assert!(Cidr::parse("10.0.0.0/20").unwrap().contains(ip("10.0.15.255")));
        assert!(!Cidr::parse("10.0.0.0/20").unwrap().contains(ip("10.0.16.0")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("192.0.2.1")));
        for bad in ["proxy", "10.0.0.0/33", "::1/129", "10.0.0.0/x"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_client_is_believed_only_through_a_trusted_proxy() {
        let trusted = [Cidr::parse("127.0.0.1").unwrap(), Cidr::parse("10.0.0.0/8").unwrap()];
        let proxy = ip("127.0.0.1");
        assert_eq!(client_address(proxy, Some("203.0.113.7"), &trusted), ip("203.0.113.7"));
        // A client cannot choose its address by sending the header itself: the proxy appends
        // what it saw, and that is what counts.
        assert_eq!(client_address(proxy, Some("198.51.100.1, 203.0.113.7"), &trusted), ip("203.0.113.7"));
        // Through two trusted proxies.
        assert_eq!(client_address(proxy, Some("203.0.113.7, 10.0.0.9"), &trusted), ip("203.0.113.7"));
        assert_eq!(client_address(ip("192.0.2.50"), Some("203.0.113.7"), &trusted), ip("192.0.2.50"), "untrusted peer");
        assert_eq!(client_address(proxy, None, &trusted), proxy);
        assert_eq!(client_address(proxy, Some("garbage"), &trusted), proxy);
    }
}
