//! Image URL policy: data:, file:// confinement, http(s) gating, private-address refusal.

use std::net::IpAddr;

use smg_core::fetch::{check_http_host, resolve_image_url, FetchError, FetchPolicy, ImageSource};

fn policy() -> FetchPolicy {
    FetchPolicy {
        file_root: None,
        allow_http: true,
        allow_private_hosts: false,
        max_bytes: 1 << 20,
    }
}

#[test]
fn data_urls() {
    let p = policy();
    assert_eq!(
        resolve_image_url("data:image/png;base64,aGVsbG8=", &p),
        Ok(ImageSource::Bytes(b"hello".to_vec()))
    );
    assert_eq!(
        resolve_image_url("data:image/png;base64,aGVsbG8", &p),
        Ok(ImageSource::Bytes(b"hello".to_vec()))
    );
    assert_eq!(
        resolve_image_url("data:;base64,aGVs\nbG8=", &p),
        Ok(ImageSource::Bytes(b"hello".to_vec()))
    );
    let e = resolve_image_url("data:image/png;base64,@@@", &p).unwrap_err();
    assert_eq!(e.code(), "invalid_base64");
    assert_eq!(
        resolve_image_url("data:image/png,abc", &p)
            .unwrap_err()
            .code(),
        "invalid_image_url"
    );
    assert_eq!(
        resolve_image_url("data:image/png;base64", &p)
            .unwrap_err()
            .code(),
        "invalid_image_url"
    );
    let small = FetchPolicy {
        max_bytes: 3,
        ..policy()
    };
    assert!(matches!(
        resolve_image_url("data:x;base64,aGVsbG8=", &small),
        Err(FetchError::TooLarge { .. })
    ));
}

#[test]
fn http_gating() {
    let mut p = policy();
    assert_eq!(
        resolve_image_url("https://example.com/a.png", &p),
        Ok(ImageSource::Http("https://example.com/a.png".into()))
    );
    assert_eq!(
        resolve_image_url("http://user@evil/a.png", &p)
            .unwrap_err()
            .code(),
        "invalid_image_url"
    );
    p.allow_http = false;
    assert_eq!(
        resolve_image_url("https://example.com/a.png", &p)
            .unwrap_err()
            .code(),
        "image_url_forbidden"
    );
    assert_eq!(
        resolve_image_url("gopher://x", &p).unwrap_err().code(),
        "invalid_image_url"
    );
    assert_eq!(
        resolve_image_url("", &p).unwrap_err().code(),
        "invalid_image_url"
    );
    assert_eq!(
        resolve_image_url("dätä:ü", &p).unwrap_err().code(),
        "invalid_image_url"
    );
}

#[test]
fn private_hosts() {
    let p = policy();
    for ip in [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "224.0.0.1",
    ] {
        let ip: IpAddr = ip.parse().unwrap();
        assert_eq!(
            check_http_host(ip, &p).unwrap_err().code(),
            "image_url_forbidden",
            "{ip}"
        );
    }
    for ip in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"] {
        assert!(check_http_host(ip.parse().unwrap(), &p).is_ok(), "{ip}");
    }
    let open = FetchPolicy {
        allow_private_hosts: true,
        ..policy()
    };
    assert!(check_http_host("127.0.0.1".parse().unwrap(), &open).is_ok());
}

#[test]
fn file_urls_stay_under_root() {
    let dir = std::env::temp_dir().join(format!("smg-fetch-{}", std::process::id()));
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("a b.png"), b"img").unwrap();
    std::fs::write(dir.join("secret"), b"no").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.join("secret"), root.join("link")).unwrap();
    let p = FetchPolicy {
        file_root: Some(root.clone()),
        ..policy()
    };
    let r = root.display();
    assert_eq!(
        resolve_image_url(&format!("file://{r}/a%20b.png"), &p),
        Ok(ImageSource::Bytes(b"img".to_vec()))
    );
    assert_eq!(
        resolve_image_url(&format!("file://{r}/../secret"), &p)
            .unwrap_err()
            .code(),
        "image_url_forbidden"
    );
    #[cfg(unix)]
    assert_eq!(
        resolve_image_url(&format!("file://{r}/link"), &p)
            .unwrap_err()
            .code(),
        "image_url_forbidden"
    );
    assert_eq!(
        resolve_image_url(&format!("file://{r}/missing"), &p)
            .unwrap_err()
            .code(),
        "image_not_found"
    );
    assert_eq!(
        resolve_image_url("file://otherhost/etc/passwd", &p)
            .unwrap_err()
            .code(),
        "invalid_image_url"
    );
    let none = policy();
    assert_eq!(
        resolve_image_url(&format!("file://{r}/a%20b.png"), &none)
            .unwrap_err()
            .code(),
        "image_url_forbidden"
    );
    std::fs::remove_dir_all(&dir).ok();
}
