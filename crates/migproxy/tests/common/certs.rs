//! Test PKIs in QEMU's x509 directory layout, made with rcgen.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SerialNumber, date_time_ymd,
};

/// A certificate authority that signs host certificates.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    next_serial: u64,
}

/// What a host certificate pair was issued with.
pub struct Issued {
    pub client_serial: u64,
}

/// When a certificate is valid, in whole years from 1975 to 4096.
#[derive(Clone, Copy)]
pub struct Validity {
    pub from_year: i32,
    pub to_year: i32,
}

impl Validity {
    pub const NOW: Validity = Validity {
        from_year: 2020,
        to_year: 2099,
    };
    pub const EXPIRED: Validity = Validity {
        from_year: 2001,
        to_year: 2002,
    };
    pub const NOT_YET: Validity = Validity {
        from_year: 2098,
        to_year: 2099,
    };
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert,
            key,
            next_serial: 100,
        }
    }

    fn issue(
        &mut self,
        subject: &[(DnType, &str)],
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> (String, String, u64) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        for (kind, value) in subject {
            params.distinguished_name.push(kind.clone(), *value);
        }
        params.extended_key_usages = vec![usage];
        params.not_before = date_time_ymd(validity.from_year, 1, 1);
        params.not_after = date_time_ymd(validity.to_year, 1, 1);
        self.next_serial += 1;
        params.serial_number = Some(SerialNumber::from(self.next_serial));
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem(), self.next_serial)
    }

    /// Writes a host's directory: this CA, a server certificate for `names`, and a client
    /// certificate with common name `client_cn`.
    pub fn write_host(&mut self, dir: &Path, names: &[&str], client_cn: &str) -> Issued {
        self.write_host_valid(dir, names, client_cn, Validity::NOW)
    }

    /// As [`write_host`](Self::write_host), with both certificates valid only in `validity`.
    pub fn write_host_valid(
        &mut self,
        dir: &Path,
        names: &[&str],
        client_cn: &str,
        validity: Validity,
    ) -> Issued {
        let subject = [
            (DnType::CommonName, client_cn),
            (DnType::OrganizationName, "migproxy tests"),
        ];
        self.write_host_as(dir, names, &subject, validity)
    }

    /// As [`write_host_valid`](Self::write_host_valid), with the client certificate's
    /// subject attributes in the order given.
    pub fn write_host_as(
        &mut self,
        dir: &Path,
        names: &[&str],
        client_subject: &[(DnType, &str)],
        validity: Validity,
    ) -> Issued {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("ca-cert.pem"), self.cert.pem()).unwrap();
        let server_subject = [
            (DnType::CommonName, names[0]),
            (DnType::OrganizationName, "migproxy tests"),
        ];
        let (cert, key, _) = self.issue(
            &server_subject,
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            validity,
        );
        std::fs::write(dir.join("server-cert.pem"), cert).unwrap();
        std::fs::write(dir.join("server-key.pem"), key).unwrap();
        let (cert, key, client_serial) = self.issue(
            client_subject,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            validity,
        );
        std::fs::write(dir.join("client-cert.pem"), cert).unwrap();
        std::fs::write(dir.join("client-key.pem"), key).unwrap();
        Issued { client_serial }
    }

    /// Writes `DIR/ca-crl.pem` revoking the given serials.
    pub fn write_crl(&self, dir: &Path, revoked: &[u64]) {
        std::fs::write(dir.join("ca-crl.pem"), self.crl(revoked).pem().unwrap()).unwrap();
    }

    /// As [`write_crl`](Self::write_crl), in DER (as `openssl crl -outform DER` writes).
    pub fn write_crl_der(&self, dir: &Path, revoked: &[u64]) {
        std::fs::write(dir.join("ca-crl.pem"), self.crl(revoked).der()).unwrap();
    }

    /// A revocation list signed by this CA.
    pub fn crl(&self, revoked: &[u64]) -> rcgen::CertificateRevocationList {
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2024, 1, 1),
            next_update: date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: date_time_ymd(2024, 1, 1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.cert, &self.key).unwrap()
    }

    /// This CA's certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }
}
