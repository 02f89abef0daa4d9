//! Who a request comes from when no token says so (`AUTH_MODE=none`): the peer's address, or, when
//! the peer is a trusted proxy (`TRUSTED_PROXIES`), the nearest address in `X-Forwarded-For` that is
//! not one. Only trusted proxies are believed: anyone can send the header, so taking its first entry
//! would let each request pick its own identity and its own budget.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// The client's address.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    // An IPv4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d; it is the IPv4 address.
    let peer = peer.to_canonical();
    let is_trusted = |address: &IpAddr| trusted.iter().any(|net| net.contains(address));
    if !is_trusted(&peer) {
        return peer;
    }
    // Each proxy appends the address it got the request from, so read right to left: the first address
    // no trusted proxy owns is the client. An entry that is not an address ends the walk: what lies
    // left of it cannot be vouched for, so the last address that could be is the client.
    let mut client = peer;
    // A value that is not text is an entry that is not an address: it ends the walk like one.
    let values = headers.get_all("x-forwarded-for").iter().map(|value| value.to_str().unwrap_or("?"));
    let entries: Vec<&str> = values.flat_map(|value| value.split(',')).collect();
    for entry in entries.iter().rev() {
        let Some(address) = parse(entry.trim()).map(|address| address.to_canonical()) else { break };
        client = address;
        if !is_trusted(&address) {
            break;
        }
    }
    client
}

/// An address as proxies write it: bare, or IPv6 in brackets (RFC 7239 style), maybe with a port.
fn parse(entry: &str) -> Option<IpAddr> {
    if let Ok(address) = entry.parse() {
        return Some(address);
    }
    let host = match entry.strip_prefix('[') {
        Some(rest) => rest.split_once(']')?.0,
        None => entry.rsplit_once(':')?.0,
    };
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(peer: &str, forwarded: &[&str], trusted: &[&str]) -> String {
        let mut headers = HeaderMap::new();
        for value in forwarded {
            headers.append("x-forwarded-for", value.parse().unwrap());
        }
        let trusted: Vec<IpNet> = trusted.iter().map(|net| net.parse().unwrap()).collect();
        client_address(peer.parse().unwrap(), &headers, &trusted).to_string()
    }

    #[test]
    fn the_header_is_ignored_unless_the_peer_is_trusted() {
        assert_eq!(client("203.0.113.9", &["1.2.3.4"], &[]), "203.0.113.9");
        assert_eq!(client("203.0.113.9", &["1.2.3.4"], &["10.0.0.0/8"]), "203.0.113.9");
    }

    #[test]
    fn the_last_untrusted_address_is_the_client() {
        let trusted = ["10.0.0.0/8"];
        // A client's own forged entry sits left of what the proxies appended: it is never taken.
        assert_eq!(client("10.0.0.2", &["6.6.6.6, 198.51.100.7, 10.0.0.1"], &trusted), "198.51.100.7");
        assert_eq!(client("10.0.0.2", &["6.6.6.6", "198.51.100.7:4711"], &trusted), "198.51.100.7");
        assert_eq!(client("10.0.0.2", &["[2001:db8::1]:443"], &trusted), "2001:db8::1");
        // Everything trusted: the leftmost; garbage stops the walk at the last good address.
        assert_eq!(client("10.0.0.2", &["10.0.0.9, 10.0.0.1"], &trusted), "10.0.0.9");
        assert_eq!(client("10.0.0.2", &["198.51.100.7, nonsense, 10.0.0.1"], &trusted), "10.0.0.1");
        assert_eq!(client("10.0.0.2", &[], &trusted), "10.0.0.2");
        assert_eq!(client("::ffff:10.0.0.2", &["198.51.100.7"], &trusted), "198.51.100.7");
    }
}
