//! Who a peer is: the subject and alternative names of its certificate, as shown in logs and
//! matched by the allow-list.

use std::fmt;

use rustls_pki_types::CertificateDer;

/// The certificate identity of a connected peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// Subject distinguished name, as `CN=…, O=…`, in the certificate's order.
    pub subject: String,
    /// The subject's attributes as `(TYPE, value)`, the type's short name in upper case:
    /// what `--tls-allow` patterns match.
    pub attributes: Vec<(String, String)>,
    /// Subject alternative names, as `DNS:name` and `IP:address`.
    pub names: Vec<String>,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.subject)?;
        if !self.names.is_empty() {
            write!(f, " ({})", self.names.join(", "))?;
        }
        Ok(())
    }
}

/// The subject and alternative names of a certificate.
pub(super) fn of_certificate(leaf: &CertificateDer<'_>) -> Identity {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return Identity::default();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => {
                    names.push(format!("DNS:{dns}"))
                }
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    if let Some(ip) = ip_text(ip) {
                        names.push(format!("IP:{ip}"));
                    }
                }
                _ => {}
            }
        }
    }
    Identity {
        subject: cert.subject().to_string(),
        attributes: attributes(cert.subject()),
        names,
    }
}

/// The subject's attributes whose values are text (the others cannot match a pattern).
fn attributes(subject: &x509_parser::x509::X509Name<'_>) -> Vec<(String, String)> {
    let registry = x509_parser::objects::oid_registry();
    subject
        .iter_attributes()
        .filter_map(|attribute| {
            let value = attribute.as_str().ok()?;
            let key = x509_parser::objects::oid2abbrev(attribute.attr_type(), registry)
                .map(str::to_owned)
                .unwrap_or_else(|_| attribute.attr_type().to_id_string());
            Some((key.to_ascii_uppercase(), value.to_owned()))
        })
        .collect()
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).to_string()),
        _ => None,
    }
}
