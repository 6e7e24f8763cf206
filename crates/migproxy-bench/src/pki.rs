//! A throwaway PKI in QEMU's x509 layout, for the TLS routes.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::measure::BenchError;

/// Writes ca-cert.pem, server-cert/key and client-cert/key (for `localhost`, 127.0.0.1).
pub fn write(dir: &Path) -> Result<(), BenchError> {
    write_for(dir, &[])
}

/// As [`write`], the certificates naming `more` hosts too (names or IP addresses).
pub fn write_for(dir: &Path, more: &[&str]) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "migproxy bench CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca-cert.pem"), ca.pem())?;
    for (role, usage) in [
        ("server", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = KeyPair::generate()?;
        let names = ["localhost", "127.0.0.1"].iter().chain(more);
        let mut params =
            CertificateParams::new(names.map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("bench {role}"));
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        std::fs::write(dir.join(format!("{role}-cert.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{role}-key.pem")), key.serialize_pem())?;
    }
    Ok(())
}
