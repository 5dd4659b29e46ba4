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
    _tree(root, {
        "adminConsole": {"port": 9090, "securePort": 9091, "interface": o["console_interface"],
                         "access": {"allow-wildcards-in-excludes": "true"}},
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
            **({"users": users} if users else {}),
        },
        "xmpp": {"client": {"tls": {"policy": "required"}},
                 "offline": {"type": "store_and_drop", "quota": o["offline_quota"]}},
        "conversation": {"messageArchiving": "true", "metadataArchiving": "true",
                         "maxAge": 0},
        "plugin": {"restapi": {"enabled": "true", "httpAuth": "secret",
                               "secret": secret(config["rest.secret"]),
                               "allowedIPs": "127.0.0.1"}},
    })
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def strip_secrets(xml_text: str) -> str:
    """openfire.xml after the first boot, without the REST secret left there in clear text."""
    root = ET.fromstring(xml_text)  # noqa: S314 - our own file
    restapi = root.find("plugin/restapi")
    if restapi is not None:
        for name in ("secret",):
            node = restapi.find(name)
            if node is not None:
                restapi.remove(node)
    autosetup = root.find("autosetup")  # Openfire deletes it after setup; make sure
    if autosetup is not None:
        root.remove(autosetup)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
