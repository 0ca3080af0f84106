//! One allowlist prefix: an IPv4 or IPv6 network, validated.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use serde::{Serialize, Serializer};

/// A network in canonical form: no host bits set, never IPv4-mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix(IpNet);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefixError {
    #[error("not an IPv4 or IPv6 address or prefix")]
    Invalid,
    #[error("host bits set: the network is {network} (or write a host address with /{max})")]
    HostBits { network: IpNet, max: u8 },
    #[error(
        "IPv4-mapped and IPv4-compatible IPv6 addresses never reach the datapath; write the IPv4 form ({v4})"
    )]
    Mapped { v4: String },
}

impl Prefix {
    #[must_use]
    pub fn net(&self) -> IpNet {
        self.0
    }

    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }

    #[must_use]
    pub fn is_ipv4(&self) -> bool {
        matches!(self.0, IpNet::V4(_))
    }

    #[must_use]
    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    /// The host prefix of one address (/32 or /128). IPv4-mapped IPv6
    /// addresses become their IPv4 form; IPv4-compatible ones are refused
    /// as in a config.
    pub fn host(ip: IpAddr) -> Result<Self, PrefixError> {
        ip.to_canonical().to_string().parse()
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let net = match s.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => IpNet::from(s.parse::<IpAddr>().map_err(|_| PrefixError::Invalid)?),
        };
        if net.trunc() != net {
            return Err(PrefixError::HostBits {
                network: net.trunc(),
                max: net.max_prefix_len(),
            });
        }
        if let IpNet::V6(v6) = net {
            let seg = v6.network().segments();
            // ::ffff:0:0/96 and ::/96 (but ::/n for n < 96, ::/128 and ::1/128
            // are ordinary IPv6 prefixes).
            let head_zero = seg[..5].iter().all(|s| *s == 0);
            let mapped = head_zero && seg[5] == 0xffff && v6.prefix_len() >= 96;
            let compat = head_zero
                && seg[5] == 0
                && v6.prefix_len() >= 96
                && !(seg[6] == 0 && seg[7] <= 1 && v6.prefix_len() >= 127);
            if mapped || compat {
                let o = v6.network().octets();
                let v4 = std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]);
                let len = v6.prefix_len() - 96;
                return Err(PrefixError::Mapped {
                    v4: format!("{v4}/{len}"),
                });
            }
        }
        Ok(Prefix(net))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Prefix {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_get_full_length() {
        assert_eq!(
            "192.0.2.7".parse::<Prefix>().unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            "2001:db8::7".parse::<Prefix>().unwrap().to_string(),
            "2001:db8::7/128"
        );
        assert_eq!("::1".parse::<Prefix>().unwrap().to_string(), "::1/128");
        assert_eq!("0.0.0.0/0".parse::<Prefix>().unwrap().prefix_len(), 0);
    }

    #[test]
    fn refuses_bad_input() {
        assert_eq!("192.0.2.1/33".parse::<Prefix>(), Err(PrefixError::Invalid));
        assert_eq!("example.com".parse::<Prefix>(), Err(PrefixError::Invalid));
        assert_eq!("".parse::<Prefix>(), Err(PrefixError::Invalid));
        let e = "192.0.2.1/24".parse::<Prefix>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "host bits set: the network is 192.0.2.0/24 (or write a host address with /32)"
        );
        assert!(matches!(
            "::ffff:192.0.2.1".parse::<Prefix>(),
            Err(PrefixError::Mapped { .. })
        ));
        assert!(matches!(
            "::192.0.2.1".parse::<Prefix>(),
            Err(PrefixError::Mapped { .. })
        ));
        assert!(matches!(
            "::ffff:0:0/96".parse::<Prefix>(),
            Err(PrefixError::Mapped { .. })
        ));
    }
}
