package upstreams

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/sesv2"
	"github.com/aws/aws-sdk-go-v2/service/sesv2/types"
	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"
)

const (
	// sesMaxRecipients is SES's limit of destinations (To+Cc+Bcc) per message.
	sesMaxRecipients = 50
	// sesMaxEncoded is SES v2's message size limit, which counts the message
	// after base64 encoding ("40 MB"; read as 40,000,000 to be safe). Raw
	// messages above ~28.6 MiB exceed it.
	sesMaxEncoded = 40_000_000
)

// sesUpstream sends raw MIME through the Amazon SES v2 SendEmail API. The envelope
// recipients go in Destination, which is what makes Bcc work: SES delivers
// to Destination, not to the headers.
type sesUpstream struct {
	name      string
	client    *sesv2.Client
	configSet string
	timeout   time.Duration
	log       *slog.Logger
	secrets   []Secret
}

func newSES(c Config, d Deps) (*sesUpstream, error) {
	timeout := c.Timeout
	hc := d.httpClient(timeout)
	var cfg aws.Config
	if c.AccessKeyID != "" || c.SecretAccessKey != "" {
		cfg = aws.Config{
			Region:      c.Region,
			Credentials: credentials.NewStaticCredentialsProvider(c.AccessKeyID.Reveal(), c.SecretAccessKey.Reveal(), ""),
		}
	} else {
		// The default chain: env, shared files, web identity (IRSA), ECS,
		// IMDS. Loading reads only env and files; nothing is fetched until
		// the first send.
		var err error
		cfg, err = awsconfig.LoadDefaultConfig(context.Background(), awsconfig.WithRegion(c.Region))
		if err != nil {
			return nil, fmt.Errorf("aws config: %v", err)
		}
	}
	cfg.HTTPClient = hc
	if cfg.Credentials != nil {
		cfg.Credentials = credsProvider{cfg.Credentials}
	}
	// The SDK would retry 429/5xx itself (3 attempts with backoff); the
	// relay owns retries and failover, so one attempt per call.
	cfg.RetryMaxAttempts = 1
	client := sesv2.NewFromConfig(cfg, func(o *sesv2.Options) {
		if c.Endpoint != "" {
			o.BaseEndpoint = aws.String(c.Endpoint)
		}
	})
	return &sesUpstream{
		name: c.Name, client: client, configSet: c.ConfigurationSet, timeout: timeout,
		log: d.logger(), secrets: []Secret{c.AccessKeyID, c.SecretAccessKey},
	}, nil
}

// Name returns the configured name.
func (s *sesUpstream) Name() string { return s.name }

// Send delivers m in calls of at most 50 recipients and returns the first
// call's MessageId. If a later call fails, the receipt refuses only the
// recipients not yet delivered.
func (s *sesUpstream) Send(ctx context.Context, m *Message) (Receipt, error) {
	if len(m.To) == 0 {
		return Receipt{}, errorf(s.name, Rejected, "", nil, "no recipients")
	}
	if needsUTF8(m) {
		// SES does not support SMTPUTF8: addresses must be 7-bit ASCII
		// (API_Destination). Refuse before calling the API so the route
		// fails over to an upstream that may take it (an SMTP smarthost
		// offering SMTPUTF8) instead of dead-lettering.
		//
		// Class: Unsupported ("this upstream cannot carry this message"):
		// the next upstream is tried now, no breaker counts it, and only
		// when no upstream of the route can carry it is it dead-lettered.
		// The alternatives are worse: ProviderFault opens the breaker for
		// every sender; Transient counts towards it and means "retry", for
		// a condition that never heals; SenderRejected would open the
		// (ses, sender domain) breaker, wrong for a non-ASCII recipient and
		// in a sidecar with one sender domain nearly SES-wide. Punycode for
		// IDN domains is not attempted: such messages usually carry the
		// same UTF-8 addresses in their headers, which SES may reject
		// (MessageRejected: dead-letter) where failing over would deliver.
		who := "recipient"
		if !IsASCII(m.From) {
			who = "sender"
		}
		return Receipt{}, errorf(s.name, Unsupported, "SMTPUTF8", nil,
			"SES does not support SMTPUTF8: non-ASCII envelope %s", who)
	}
	if n := base64.StdEncoding.EncodedLen(int(m.size())); n > sesMaxEncoded {
		// SES would refuse it (Rejected: dead-letter) although another
		// upstream of the route may take it; max_message_bytes counts raw
		// bytes, so this can pass the policy's size check.
		return Receipt{}, errorf(s.name, Unsupported, "size", nil,
			"message is %d bytes, %d after base64; SES takes at most %d", m.size(), n, sesMaxEncoded)
	}
	// No memory is reserved: each call streams the body from where it
	// rests (sesStream), holding a few KiB of it at a time.
	rc, err := sendChunks(m.To, sesMaxRecipients, func(rcpts []string) (string, *Error) {
		return s.send(ctx, m, rcpts)
	})
	if err != nil || len(rc.Refused) > 0 {
		return rc, err
	}
	s.log.Debug("ses accepted message", "upstream", s.name, "msg_id", m.ID, "provider_id", rc.ProviderID, "rcpt_count", len(m.To))
	return rc, nil
}

// send makes one SendEmail call for rcpts.
func (s *sesUpstream) send(ctx context.Context, m *Message, rcpts []string) (string, *Error) {
	ctx, cancel := context.WithTimeoutCause(ctx, s.timeout, apiTimeoutCause(s.timeout))
	defer cancel()
	ctx, progress := apiTrace(ctx)
	raw := &types.RawMessage{}
	var opts []func(*sesv2.Options)
	if m.size() > 0 {
		// The SDK serializes a placeholder, which sesStreamOption replaces
		// with the body's base64 as the request goes out: the SDK would
		// hold the message, its base64 and a copy of the document.
		var marker string
		raw.Data, marker = sesMarker()
		opts = append(opts, sesStreamOption(m.Body, marker))
	} // else Data stays nil: the SDK's input check refuses an empty message
	in := &sesv2.SendEmailInput{
		Content:     &types.EmailContent{Raw: raw},
		Destination: &types.Destination{ToAddresses: rcpts},
	}
	if m.From != "" {
		in.FromEmailAddress = aws.String(m.From)
	}
	if s.configSet != "" {
		in.ConfigurationSetName = aws.String(s.configSet)
	}
	out, err := s.client.SendEmail(ctx, in, opts...)
	if err != nil {
		return "", s.classify(ctx, err, progress)
	}
	if out.MessageId == nil || *out.MessageId == "" {
		return "", errorf(s.name, Ambiguous, "", nil, "SES answered success without a MessageId")
	}
	return *out.MessageId, nil
}

// classify maps an SDK error to a class: by SES error code first (a 400
// alone says nothing at SES), then by HTTP status, then as a transport error.
func (s *sesUpstream) classify(ctx context.Context, err error, p *apiProgress) *Error {
	var ce *credentialsError
	if errors.As(err, &ce) {
		return s.credentialsFailure(ctx, ce)
	}
	status := 0
	var re *smithyhttp.ResponseError
	if errors.As(err, &re) {
		status = re.HTTPStatusCode()
	}
	var ae smithy.APIError
	if errors.As(err, &ae) && status != 0 {
		code, msg := ae.ErrorCode(), ae.ErrorMessage()
		class, ok := sesCodeClass(code, msg)
		if !ok {
			class = classifyHTTP(status)
		}
		return &Error{
			Upstream: s.name, Class: class, Code: code,
			Reason: truncate(apiRedact(fmt.Sprintf("HTTP %d %s: %s", status, code, oneLine(msg)), s.secrets...), 300),
			// time.Now, not Deps.Now: this adapter keeps no clock yet.
			RetryAt: sesRetryAt(code, msg, time.Now()),
			err:     err,
		}
	}
	if status != 0 {
		// An answer the SDK could not decode, e.g. a proxy's HTML page, or
		// one cut off by the response bound or the timeout: a 2xx may mean
		// SES has the message, never that it was delivered without an id.
		class := classifyHTTP(status)
		if status >= 200 && status < 300 {
			class = Ambiguous
		}
		why := "undecodable response"
		if errors.Is(err, errResponseTooLarge) || errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
			why = apiUnreadable(err)
		}
		return &Error{Upstream: s.name, Class: class, Code: strconv.Itoa(status),
			Reason: fmt.Sprintf("HTTP %d: %s", status, why), err: err}
	}
	var ipe smithy.InvalidParamsError
	if errors.As(err, &ipe) {
		// The SDK's own input check, before any request: this message
		// cannot be expressed as a SendEmail call (say, no content).
		return &Error{Upstream: s.name, Class: Unsupported, Reason: truncate("SDK refused the request: "+oneLine(ipe.Error()), 300), err: err}
	}
	if p.reply.Load() {
		// A response started but broke off: the provider may have the message.
		return &Error{Upstream: s.name, Class: Ambiguous, Reason: "response broke off", err: err}
	}
	return apiTransportError(ctx, s.name, err, p, s.secrets...)
}

// credsProvider marks a failure to get credentials (STS for IRSA, IMDS,
// SSO, a web identity token file): it comes before any request to SES, and
// its error wraps the credential service's own answer, which must not be
// read as SES's (STS's 400 InvalidIdentityToken is no rejected message,
// and a timeout there no ambiguous send).
type credsProvider struct{ aws.CredentialsProvider }

func (p credsProvider) Retrieve(ctx context.Context) (aws.Credentials, error) {
	c, err := p.CredentialsProvider.Retrieve(ctx)
	if err != nil {
		return c, &credentialsError{err}
	}
	return c, nil
}

type credentialsError struct{ err error }

func (e *credentialsError) Error() string { return "getting AWS credentials: " + e.err.Error() }
func (e *credentialsError) Unwrap() error { return e.err }

// credentialsFailure classes a credentials failure: SES was never called,
// so never Rejected or Ambiguous. A credential service that is down, slow
// or throttling is Transient; any other answer (a refused role, a missing
// OIDC provider or token file) is this upstream's setup: ProviderFault.
func (s *sesUpstream) credentialsFailure(ctx context.Context, ce *credentialsError) *Error {
	class := ProviderFault
	var re *smithyhttp.ResponseError
	var ne net.Error
	switch {
	case errors.As(ce.err, &re):
		if st := re.HTTPStatusCode(); st >= 500 || st == http.StatusTooManyRequests {
			class = Transient
		}
		if ae := smithy.APIError(nil); errors.As(ce.err, &ae) {
			c, ok := sesCodeClass(ae.ErrorCode(), "")
			if (ok && c == Transient) || ae.ErrorCode() == "IDPCommunicationError" {
				class = Transient // STS throttling, or the cluster's OIDC issuer unreachable from STS
			}
		}
	case ctx.Err() != nil, errors.Is(ce.err, context.DeadlineExceeded), errors.As(ce.err, &ne):
		class = Transient
	}
	return &Error{Upstream: s.name, Class: class, Code: "credentials",
		Reason: truncate(apiRedact("AWS credentials: "+oneLine(ce.err.Error()), s.secrets...), 300), err: ce}
}

// sesCodeClass maps an SES/AWS error code; ok is false for codes it does not
// know, which then fall back to the HTTP status.
func sesCodeClass(code, msg string) (Class, bool) {
	switch code {
	case "MessageRejected":
		// In the sandbox the same text is given for unverified recipients;
		// failing over is right for both.
		if strings.Contains(strings.ToLower(msg), "email address is not verified") {
			return SenderRejected, true
		}
		return Rejected, true
	case "MailFromDomainNotVerifiedException", "MailFromDomainNotVerified":
		return SenderRejected, true
	case "AccountSuspendedException", "SendingPausedException", "NotFoundException",
		"AccessDenied", "AccessDeniedException", "UnrecognizedClientException",
		"SignatureDoesNotMatch", "InvalidClientTokenId", "IncompleteSignature",
		"MissingAuthenticationToken", "ExpiredToken", "ExpiredTokenException":
		return ProviderFault, true
	case "TooManyRequestsException", "LimitExceededException", "Throttling",
		"ThrottlingException", "RequestThrottled", "RequestLimitExceeded":
		return Transient, true
	case "BadRequestException":
		return Rejected, true
	}
	return 0, false
}

// sesRetryAt is when SES may be called again after a throttling error,
// zero for any other error. SES says no Retry-After: "Maximum sending rate
// exceeded" is a per-second limit, so the default pause; "Daily message
// quota exceeded" is the rolling 24 h quota, which frees up only as the
// sends of a day ago age out, so throttleMax (probing hourly costs one
// request). LimitExceededException is a resource-count limit unless its
// text says rate or quota: no pause then, and it counts as a failure.
func sesRetryAt(code, msg string, now time.Time) time.Time {
	m := strings.ToLower(msg)
	quota := strings.Contains(m, "quota exceeded")
	switch code {
	case "TooManyRequestsException", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded":
	case "LimitExceededException":
		if !quota && !strings.Contains(m, "rate exceeded") {
			return time.Time{}
		}
	default:
		return time.Time{}
	}
	if quota {
		return now.Add(throttleMax)
	}
	return now.Add(throttleDefault)
}

var _ Upstream = (*sesUpstream)(nil)
