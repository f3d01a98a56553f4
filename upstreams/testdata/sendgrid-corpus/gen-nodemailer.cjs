// Writes nm-*.eml with nodemailer's MailComposer and, for each, a .want.json
// computed from the options given to MailComposer. Usage:
//   NODE_PATH=<dir>/node_modules node gen-nodemailer.cjs <outdir> <version>
'use strict';

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const MailComposer = require('nodemailer/lib/mail-composer');

const [outDir, version] = process.argv.slice(2);
const source = `nodemailer ${version} MailComposer`;

// A 1x1 PNG, a tiny PDF and 1 KiB of every byte value.
const png = Buffer.from(
  'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==',
  'base64'
);
const pdf = Buffer.from('%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n');
const pdf2 = Buffer.from('%PDF-1.4\n% second document, utf-8 filename\n%%EOF\n');
const bin = Buffer.alloc(1024);
for (let i = 0; i < bin.length; i++) bin[i] = i % 256;
const notes = Buffer.from('line one\r\nline two: ü ✓\r\n', 'utf8');

const sha256 = b => crypto.createHash('sha256').update(b).digest('hex');

// addr turns nodemailer's address forms into {name, email}.
function addr(a) {
  if (typeof a === 'string') {
    const m = a.match(/^\s*(.*?)\s*<([^>]+)>\s*$/);
    return m ? { name: m[1].replace(/^"|"$/g, ''), email: m[2] } : { name: '', email: a.trim() };
  }
  return { name: a.name || '', email: a.address };
}
const list = v => (v === undefined ? [] : Array.isArray(v) ? v : [v]).map(addr);

// The documented SendGrid mapping rules applied to the inputs.
function want(mail, envelope, extra) {
  const env = envelope.to.map(e => e.toLowerCase());
  const used = new Set();
  const visible = field =>
    list(mail[field])
      .filter(a => env.includes(a.email.toLowerCase()) && !used.has(a.email.toLowerCase()))
      .map(a => {
        used.add(a.email.toLowerCase());
        return { name: /[;,]/.test(a.name) ? '' : a.name, email: a.email };
      });
  const to = visible('to');
  const cc = visible('cc');
  const bcc = envelope.to.filter(e => !used.has(e.toLowerCase())).map(e => ({ name: '', email: e }));
  const headers = Object.assign({ 'Message-ID': mail.messageId }, extra.headers || {});
  return Object.assign(
    {
      source,
      envelope,
      unsupported: false,
      from: addr(mail.from),
      reply_to: list(mail.replyTo),
      subject: mail.subject,
      to,
      cc,
      bcc,
      text: mail.text || '',
      html: mail.html || '',
      attachments: (mail.attachments || []).map(a => ({
        filename: a.filename || null,
        type: (a.contentType || 'image/png').split(';')[0],
        sha256: sha256(Buffer.isBuffer(a.content) ? a.content : Buffer.from(a.content)),
        disposition: a.cid ? 'inline' : 'attachment',
        content_id: a.cid || null
      })),
      headers,
      headers_absent: extra.headers_absent || ['Bcc']
    },
    extra.override || {}
  );
}

const date = new Date('2026-11-22T10:00:00Z');
const messages = [
  {
    name: 'nm-01-plain',
    mail: {
      from: 'Nightly Job <jobs@example.com>',
      to: 'ops@example.net',
      subject: 'Nightly report',
      text: 'All jobs finished.\nNothing to do.\n'
    },
    envelope: { from: 'jobs@example.com', to: ['ops@example.net'] }
  },
  {
    // RFC 2047 subject and names, a name with ',' and one with ';', a To
    // address routed elsewhere (not in this envelope), an envelope-only rcpt.
    name: 'nm-02-alternative-i18n',
    mail: {
      from: { name: 'Zoë Ångström', address: 'zoe@example.com' },
      to: [
        { name: 'Bob Müller', address: 'bob@example.net' },
        { name: 'Doe, Jane', address: 'jane@example.net' },
        { name: 'Carol Elsewhere', address: 'carol@elsewhere.example' }
      ],
      cc: [{ name: 'Team; Ops', address: 'ops@example.org' }, 'dave@example.com'],
      replyTo: { name: 'Support Desk', address: 'support@example.com' },
      subject: 'Grüße aus Köln – Bestellübersicht Nr. 4711 ✓ (ünïcödé, long enough to be folded)',
      text: 'Hallo Bob,\n\nIhre Bestellung ist unterwegs. Größe: L, Preis: 12 €.\n',
      html: '<p>Hallo Bob,</p><p>Ihre Bestellung ist unterwegs. Größe: <b>L</b>, Preis: 12&nbsp;€.</p>'
    },
    envelope: {
      from: 'bounces@example.com',
      to: ['bob@example.net', 'jane@example.net', 'ops@example.org', 'dave@example.com', 'erin@example.com']
    }
  },
  {
    name: 'nm-03-inline-and-attachments',
    mail: {
      from: 'Reports <reports@example.com>',
      to: 'Alice <alice@example.net>',
      subject: 'Monthly report with logo',
      text: 'See the attached report.\n',
      html: '<p><img src="cid:logo@relaycar.test" alt="logo"> See the attached report.</p>',
      attachments: [
        { filename: 'logo.png', content: png, contentType: 'image/png', cid: 'logo@relaycar.test' },
        { filename: 'report.pdf', content: pdf, contentType: 'application/pdf' },
        { filename: 'data.bin', content: bin, contentType: 'application/octet-stream' },
        { filename: 'Résumé – 履歴書.pdf', content: pdf2, contentType: 'application/pdf' },
        { filename: 'notes.txt', content: notes, contentType: 'text/plain; charset=utf-8' }
      ]
    },
    envelope: { from: 'reports@example.com', to: ['alice@example.net'] }
  },
  {
    // Several Reply-To, custom headers, a repeated header (first wins), a
    // Bcc header kept by the composer (must not be sent), trace and DKIM
    // headers (reserved).
    name: 'nm-04-headers-replyto-bcc',
    mail: {
      from: 'News <news@example.com>',
      to: ['reader1@example.net', 'Reader Two <reader2@example.net>'],
      cc: 'archive@example.org',
      bcc: 'hidden@example.org',
      replyTo: ['replies@example.com', 'Sales Team <sales@example.com>'],
      subject: 'Spring campaign',
      text: 'Spring is here.\n',
      html: '<p>Spring is here.</p>',
      headers: {
        'X-Campaign': 'spring-2026',
        'List-Unsubscribe': '<mailto:unsub@example.com?subject=unsubscribe>, <https://example.com/u/42>',
        'X-Dup': ['first', 'second'],
        Received: 'from app.internal by relay.internal; Sun, 22 Nov 2026 10:00:00 +0000',
        'DKIM-Signature': 'v=1; a=rsa-sha256; d=example.com; s=sel; bh=AAAA; b=BBBB'
      }
    },
    envelope: {
      from: 'news@example.com',
      to: ['reader1@example.net', 'reader2@example.net', 'archive@example.org', 'hidden@example.org']
    },
    keepBcc: true,
    extra: {
      headers: {
        'X-Campaign': 'spring-2026',
        'List-Unsubscribe': '<mailto:unsub@example.com?subject=unsubscribe>, <https://example.com/u/42>',
        'X-Dup': 'first'
      },
      headers_absent: ['Bcc', 'Received', 'DKIM-Signature', 'MIME-Version', 'Content-Type']
    }
  },
  {
    // icalEvent adds a text/calendar alternative: cannot be represented.
    name: 'nm-05-ical-alternative',
    mail: {
      from: 'Calendar <cal@example.com>',
      to: 'bob@example.net',
      subject: 'Invitation: planning',
      text: 'You are invited.\n',
      html: '<p>You are invited.</p>',
      icalEvent: {
        method: 'REQUEST',
        content:
          'BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//relaycar//corpus//EN\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\n' +
          'UID:plan-1@example.com\r\nDTSTAMP:20261122T100000Z\r\nDTSTART:20261123T090000Z\r\n' +
          'DTEND:20261123T100000Z\r\nSUMMARY:Planning\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n'
      }
    },
    envelope: { from: 'cal@example.com', to: ['bob@example.net'] },
    extra: { override: { unsupported: true, why: 'text/calendar alternative' } }
  },
  {
    // watchHtml adds a text/watch-html alternative: cannot be represented.
    name: 'nm-06-watch-html-alternative',
    mail: {
      from: 'App <app@example.com>',
      to: 'bob@example.net',
      subject: 'Your code',
      text: 'Code: 1234\n',
      html: '<p>Code: <b>1234</b></p>',
      watchHtml: '<b>1234</b>'
    },
    envelope: { from: 'app@example.com', to: ['bob@example.net'] },
    extra: { override: { unsupported: true, why: 'text/watch-html alternative' } }
  }
];

(async () => {
  for (const [i, msg] of messages.entries()) {
    const mail = Object.assign(
      { messageId: `<${msg.name}@corpus.relaycar.test>`, date },
      msg.mail
    );
    const composer = new MailComposer(mail);
    const node = composer.compile();
    node.keepBcc = !!msg.keepBcc;
    const raw = await node.build();
    fs.writeFileSync(path.join(outDir, msg.name + '.eml'), raw);
    const w = want(mail, msg.envelope, msg.extra || {});
    fs.writeFileSync(path.join(outDir, msg.name + '.want.json'), JSON.stringify(w, null, 2) + '\n');
    void i;
  }
})().catch(err => {
  console.error(err);
  process.exit(1);
});
