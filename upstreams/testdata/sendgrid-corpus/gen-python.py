"""Writes py-*.eml with Python's stdlib email package and, for each, a
.want.json computed from the inputs given to the library.

Usage: python3 gen-python.py <outdir>
"""

import base64
import hashlib
import json
import os
import platform
import sys
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formataddr

OUT = sys.argv[1]
SOURCE = "python %s email (EmailMessage)" % platform.python_version()
DATE = "Sun, 22 Nov 2026 10:00:00 +0000"

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
PDF = b"%PDF-1.4\n% relaycar corpus (python)\n%%EOF\n"
BIN = bytes((i * 7 + 3) % 256 for i in range(2048))
XLSX = b"PK\x03\x04 not really a spreadsheet \x00\x01\x02\xff"
# A CSV in ISO-8859-1: its bytes must arrive unchanged (no UTF-8 conversion).
CSV_LATIN1 = "Größe;Preis\r\nL;12\r\n".encode("iso-8859-1")


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def sg_name(name):
    # SendGrid rejects to/cc/bcc names containing ';' or ','.
    return "" if (";" in name or "," in name) else name


def want(inp, envelope, **extra):
    """The documented SendGrid mapping of the inputs."""
    env = [e.lower() for e in envelope["to"]]
    used = set()

    def visible(addrs):
        out = []
        for name, email in addrs:
            k = email.lower()
            if k in env and k not in used:
                used.add(k)
                out.append({"name": sg_name(name), "email": email})
        return out

    to = visible(inp.get("to", []))
    cc = visible(inp.get("cc", []))
    bcc = [{"name": "", "email": e} for e in envelope["to"] if e.lower() not in used]
    headers = {"Message-ID": inp["message_id"]}
    headers.update(inp.get("headers", {}))
    w = {
        "source": SOURCE,
        "envelope": envelope,
        "unsupported": False,
        "from": {"name": inp["from"][0], "email": inp["from"][1]},
        "reply_to": [{"name": n, "email": e} for n, e in inp.get("reply_to", [])],
        "subject": inp["subject"],
        "to": to,
        "cc": cc,
        "bcc": bcc,
        "text": inp.get("text", ""),
        "html": inp.get("html", ""),
        "attachments": inp.get("attachments", []),
        "headers": headers,
        "headers_absent": inp.get("headers_absent", ["Bcc"]),
    }
    w.update(extra)
    return w


def att(filename, ctype, data, disposition="attachment", content_id=None):
    return {
        "filename": filename,
        "type": ctype,
        "sha256": sha256(data),
        "disposition": disposition,
        "content_id": content_id,
    }


def fmt(addrs):
    return ", ".join(formataddr((n, e)) if n else e for n, e in addrs)


def base_message(inp):
    msg = EmailMessage()
    msg["From"] = fmt([inp["from"]])
    if inp.get("to"):
        msg["To"] = fmt(inp["to"])
    if inp.get("cc"):
        msg["Cc"] = fmt(inp["cc"])
    if inp.get("reply_to"):
        msg["Reply-To"] = fmt(inp["reply_to"])
    msg["Subject"] = inp["subject"]
    msg["Date"] = DATE
    msg["Message-ID"] = inp["message_id"]
    for k, v in inp.get("headers", {}).items():
        msg[k] = v
    return msg


def write(name, msg, w):
    with open(os.path.join(OUT, name + ".eml"), "wb") as f:
        f.write(msg.as_bytes(policy=policy.SMTP))
    with open(os.path.join(OUT, name + ".want.json"), "w", encoding="utf-8") as f:
        json.dump(w, f, indent=2, ensure_ascii=False)
        f.write("\n")


def mid(name):
    return "<%s@corpus.relaycar.test>" % name


# 1. Plain text only.
name = "py-01-plain"
inp = {
    "from": ("", "cron@example.com"),
    "to": [("", "root@example.net")],
    "subject": "Cron <root@host> backup",
    "message_id": mid(name),
    "text": "backup finished in 42s\n",
}
msg = base_message(inp)
msg.set_content(inp["text"])
write(name, msg, want(inp, {"from": "cron@example.com", "to": ["root@example.net"]}))

# 2. text + html alternative; the html is in multipart/related with an image
# that has a Content-ID but no Content-Disposition; plus a PDF attachment.
name = "py-02-related-no-disposition"
inp = {
    "from": ("Shop Ünïcode", "shop@example.com"),
    "to": [("Ann", "ann@example.net")],
    "subject": "Ihre Bestellung – Übersicht",
    "message_id": mid(name),
    "text": "Danke für Ihre Bestellung.\n",
    "html": '<html><body><p>Danke für Ihre Bestellung.</p><img src="cid:banner.1+x@shop.example"></body></html>\n',
}
msg = base_message(inp)
msg.set_content(inp["text"])
msg.add_alternative(inp["html"], subtype="html")
html_part = msg.get_payload()[1]
html_part.add_related(PNG, "image", "png", cid="<banner.1+x@shop.example>")
img = html_part.get_payload()[1]
del img["Content-Disposition"]  # as many clients write related images
msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="invoice.pdf")
inp["attachments"] = [
    att(None, "image/png", PNG, "inline", "banner.1+x@shop.example"),
    att("invoice.pdf", "application/pdf", PDF),
]
write(name, msg, want(inp, {"from": "shop@example.com", "to": ["ann@example.net"]}))

# 3. Attachments: PDF, binary, UTF-8 filename (RFC 2231), Latin-1 CSV.
name = "py-03-attachments"
inp = {
    "from": ("Backoffice", "office@example.com"),
    "to": [("Finance", "finance@example.net")],
    "subject": "Quarterly files",
    "message_id": mid(name),
    "text": "Files attached.\n",
}
msg = base_message(inp)
msg.set_content(inp["text"])
msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="q3.pdf")
msg.add_attachment(BIN, maintype="application", subtype="octet-stream", filename="dump.bin")
utf8_name = "Übersicht 2026 – données ✓.xlsx"
xlsx_type = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
msg.add_attachment(XLSX, maintype="application", subtype=xlsx_type.split("/")[1], filename=utf8_name)
msg.add_attachment(CSV_LATIN1, maintype="text", subtype="csv", filename="sizes.csv")
msg.get_payload()[-1].set_param("charset", "iso-8859-1")
inp["attachments"] = [
    att("q3.pdf", "application/pdf", PDF),
    att("dump.bin", "application/octet-stream", BIN),
    att(utf8_name, xlsx_type, XLSX),
    att("sizes.csv", "text/csv", CSV_LATIN1),
]
write(name, msg, want(inp, {"from": "office@example.com", "to": ["finance@example.net"]}))

# 4. RFC 2047 names, several Reply-To, To/Cc lists, custom headers, Bcc-only
# envelope recipient.
name = "py-04-headers-lists"
inp = {
    "from": ("Jürgen Groß", "juergen@example.com"),
    "to": [("Ängel Ström", "angel@example.net"), ("", "b@example.net"), ("Lee, Sam", "sam@example.net")],
    "cc": [("Čeněk", "cenek@example.org"), ("", "d@example.org")],
    "reply_to": [("Jürgen", "juergen@example.com"), ("Assistenz", "office@example.com")],
    "subject": "Protokoll: Sitzung über Größenordnungen",
    "message_id": mid(name),
    "text": "Anbei das Protokoll.\n",
    "html": "<p>Anbei das <i>Protokoll</i>.</p>\n",
    "headers": {
        "X-Campaign": "board-2026-11",
        "List-Unsubscribe": "<mailto:leave@example.com>, <https://example.com/l/9>",
        "In-Reply-To": "<prev@example.com>",
    },
}
msg = base_message(inp)
msg.set_content(inp["text"])
msg.add_alternative(inp["html"], subtype="html")
envelope = {
    "from": "juergen@example.com",
    "to": ["angel@example.net", "b@example.net", "sam@example.net", "cenek@example.org", "d@example.org", "secret@example.org"],
}
write(name, msg, want(inp, envelope))

# 5. An S/MIME-like multipart/signed message: must be refused, not sent.
name = "py-05-smime-signed"
inp = {
    "from": ("Signer", "signer@example.com"),
    "to": [("", "bob@example.net")],
    "subject": "Signed statement",
    "message_id": mid(name),
}
signed = MIMEMultipart("signed", protocol="application/pkcs7-signature", micalg="sha-256")
signed["From"] = fmt([inp["from"]])
signed["To"] = fmt(inp["to"])
signed["Subject"] = inp["subject"]
signed["Date"] = DATE
signed["Message-ID"] = inp["message_id"]
signed.attach(MIMEText("I hereby state.\n", "plain", "utf-8"))
sig = MIMEApplication(b"0\x82\x01\x00 fake pkcs7 signature", "pkcs7-signature", name="smime.p7s")
sig.add_header("Content-Disposition", "attachment", filename="smime.p7s")
signed.attach(sig)
write(name, signed, want(inp, {"from": "signer@example.com", "to": ["bob@example.net"]},
                         unsupported=True, why="multipart/signed"))

# 6. multipart/mixed with two text/plain bodies (e.g. a list footer): SendGrid
# takes one text/plain, so it must be refused rather than merged.
name = "py-06-two-text-bodies"
inp = {
    "from": ("List", "list@example.com"),
    "to": [("", "member@example.net")],
    "subject": "Digest",
    "message_id": mid(name),
}
mixed = MIMEMultipart("mixed")
mixed["From"] = fmt([inp["from"]])
mixed["To"] = fmt(inp["to"])
mixed["Subject"] = inp["subject"]
mixed["Date"] = DATE
mixed["Message-ID"] = inp["message_id"]
mixed.attach(MIMEText("First body.\n", "plain", "utf-8"))
mixed.attach(MIMEText("-- \nlist footer\n", "plain", "utf-8"))
write(name, mixed, want(inp, {"from": "list@example.com", "to": ["member@example.net"]},
                        unsupported=True, why="two text/plain bodies"))
