"""Render Openfire's conf/openfire.xml with the <autosetup> block and seeded properties.

Built with ElementTree, so every value is escaped (an ``&`` in the JDBC URL or a password
becomes ``&amp;``). ``<locale>`` is always present: autosetup dies after writing setup=true
without it. Properties outside <autosetup> are copied into ofProperty on first boot.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from capsule_openfire.config import Config

MASK = "********"


def _tree(parent: ET.Element, data: dict[str, object]) -> None:
    for key, value in data.items():
        child = ET.SubElement(parent, key)
        if isinstance(value, dict):
            _tree(child, value)
        else:
            child.text = str(value)


def seeded_properties(config: Config) -> dict[str, str]:
    """The system properties seeded in openfire.xml; the first start copies them into
    ofProperty, where the installer checks them afterwards."""
    o = config.values["openfire"]
    props = {
        "xmpp.client.tls.policy": "required",
        "xmpp.offline.type": "store_and_drop",
        "xmpp.offline.quota": o["offline_quota"],
        "register.inband": o["inband_registration"],
    }
    if config.tls_max is not None:  # Openfire < 4.8 hangs after STARTTLS on TLS 1.3 (OF-2435)
        props["xmpp.socket.ssl.client.protocols"] = "TLSv1.2"
    if config.flag("plugins.monitoring"):
        props |= {"conversation.messageArchiving": "true",
                  "conversation.metadataArchiving": "true", "conversation.maxAge": "0"}
    if config.flag("plugins.restapi"):  # basic auth as the admin: no shared secret to store
        props |= {"plugin.restapi.enabled": "true", "plugin.restapi.httpAuth": "basic",
                  "plugin.restapi.allowedIPs": "127.0.0.1"}
    return props


def _nest(props: dict[str, str]) -> dict[str, object]:
    tree: dict[str, object] = {}
    for key, value in props.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})  # type: ignore[assignment]
        node[leaf] = value
    return tree


def openfire_xml(config: Config, mask_secrets: bool = False) -> str:
    """The first-boot openfire.xml; ``mask_secrets`` for dry-run output."""
    o, d = config.values["openfire"], config.values["database"]

    def secret(value: str) -> str:
        return MASK if mask_secrets else value

    users = {
        f"user{i}": {"username": u.username, "password": secret(u.password), "name": u.name,
                     "email": u.email}
        for i, u in enumerate(config.users, start=1)
    }
    root = ET.Element("jive")
    console: dict[str, object] = {"port": 9090, "securePort": 9091,
                                  "interface": o["console_interface"]}
    if config.flag("plugins.restapi"):  # else every REST request redirects to login.jsp
        console["access"] = {"allow-wildcards-in-excludes": "true"}
    _tree(root, {
        "adminConsole": console,
        "locale": o["locale"],
        "autosetup": {
            "run": "true",
            "locale": o["locale"],
            "xmpp": {"domain": o["domain"], "fqdn": o["fqdn"],
                     "auth": {"anonymous": "false"}, "socket": {"ssl": {"active": "true"}}},
            "encryption": {"algorithm": "AES", "key": secret(o["encryption_key"])},
            "database": {"mode": "standard", "defaultProvider": {
                "driver": "com.mysql.cj.jdbc.Driver", "serverURL": config.db_url,
                "username": d["user"], "password": secret(d["password"]),
                "minConnections": 5, "maxConnections": 25, "connectionTimeout": "1.0"}},
            "admin": {"email": o["admin_email"], "password": secret(o["admin_password"])},
            "authprovider": {"mode": "default"},
            **({"users": users} if users else {}),  # read from Openfire 4.7 on; provision adds them
        },
        **_nest(seeded_properties(config)),
    })
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def without_autosetup(xml_text: str) -> str:
    """openfire.xml after the first boot, without any <autosetup> left (it names passwords)."""
    root = ET.fromstring(xml_text)  # noqa: S314 - our own file
    autosetup = root.find("autosetup")  # Openfire deletes it after setup; make sure
    if autosetup is not None:
        root.remove(autosetup)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
