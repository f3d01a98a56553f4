// Package tests renders the relaycar Helm chart with helm and checks the
// result as Kubernetes would see it: every document decodes strictly into
// its k8s.io/api type. It is a separate Go module so the relay itself never
// depends on Kubernetes packages.
package tests

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"sigs.k8s.io/yaml"
)

var (
	repoRoot string
	helmBin  string
	relaycar string // built once, for `relaycar check` on rendered configs
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	root, err := filepath.Abs("../..")
	if err != nil {
		panic(err)
	}
	repoRoot = root
	helmBin = os.Getenv("HELM")
	if helmBin == "" {
		helmBin = filepath.Join(root, ".cache", "bin", "helm")
	}
	if _, err := os.Stat(helmBin); err != nil {
		fmt.Fprintf(os.Stderr, "helm not found at %s: run `make test-deps` (or set HELM)\n", helmBin)
		return 1
	}
	tmp, err := os.MkdirTemp("", "relaycar-chart-tests-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(tmp)
	relaycar = filepath.Join(tmp, "relaycar")
	if out, err := exec.Command("go", "build", "-C", root, "-o", relaycar, "./cmd/relaycar").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building relaycar: %v\n%s", err, out)
		return 1
	}
	if out, err := exec.Command(helmBin, "dependency", "build", filepath.Join(root, "examples/kubernetes/legacy-app")).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "helm dependency build: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

func chartDir() string { return filepath.Join(repoRoot, "charts", "relaycar") }

func ciValues(t *testing.T) []string {
	files, _ := filepath.Glob(filepath.Join(chartDir(), "ci", "*-values.yaml"))
	if len(files) < 4 {
		t.Fatalf("expected the four ci values files, found %v", files)
	}
	return files
}

// helm runs helm and returns stdout, or the combined output as error.
func helm(args ...string) (string, error) {
	cmd := exec.Command(helmBin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("helm %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String(), nil
}

// doc is one rendered manifest.
type doc struct {
	Kind, Name string
	Raw        []byte
}

func render(t *testing.T, chart string, args ...string) []doc {
	t.Helper()
	out, err := helm(append([]string{"template", "rc", chart, "--namespace", "mail"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	var docs []doc
	for _, part := range strings.Split(out, "\n---") {
		if strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(part), "---")) == "" {
			continue
		}
		var meta struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal([]byte(part), &meta); err != nil {
			t.Fatalf("rendered YAML does not parse: %v\n%s", err, part)
		}
		if meta.Kind == "" {
			continue // comment-only document
		}
		docs = append(docs, doc{Kind: meta.Kind, Name: meta.Metadata.Name, Raw: []byte(part)})
	}
	return docs
}

// strict decodes a manifest into its typed object, refusing unknown fields
// (a typo in a template would otherwise be silently dropped by the API).
func strict(t *testing.T, d doc, into any) {
	t.Helper()
	if err := yaml.UnmarshalStrict(d.Raw, into); err != nil {
		t.Fatalf("%s %s does not decode strictly: %v\n%s", d.Kind, d.Name, err, d.Raw)
	}
}

// objects decodes every document and fails on a kind the chart should not
// produce.
type objects struct {
	deployments  []appsv1.Deployment
	statefulsets []appsv1.StatefulSet
	services     []corev1.Service
	configMaps   []corev1.ConfigMap
	accounts     []corev1.ServiceAccount
	netpols      []networkingv1.NetworkPolicy
	pdbs         []policyv1.PodDisruptionBudget
	monitoring   []map[string]any // ServiceMonitor, PrometheusRule (CRDs)
}

func decode(t *testing.T, docs []doc) objects {
	t.Helper()
	var o objects
	for _, d := range docs {
		switch d.Kind {
		case "Deployment":
			var x appsv1.Deployment
			strict(t, d, &x)
			o.deployments = append(o.deployments, x)
		case "StatefulSet":
			var x appsv1.StatefulSet
			strict(t, d, &x)
			o.statefulsets = append(o.statefulsets, x)
		case "Service":
			var x corev1.Service
			strict(t, d, &x)
			o.services = append(o.services, x)
		case "ConfigMap":
			var x corev1.ConfigMap
			strict(t, d, &x)
			o.configMaps = append(o.configMaps, x)
		case "ServiceAccount":
			var x corev1.ServiceAccount
			strict(t, d, &x)
			o.accounts = append(o.accounts, x)
		case "NetworkPolicy":
			var x networkingv1.NetworkPolicy
			strict(t, d, &x)
			o.netpols = append(o.netpols, x)
		case "PodDisruptionBudget":
			var x policyv1.PodDisruptionBudget
			strict(t, d, &x)
			o.pdbs = append(o.pdbs, x)
		case "ServiceMonitor", "PrometheusRule":
			var x map[string]any
			if err := yaml.Unmarshal(d.Raw, &x); err != nil {
				t.Fatal(err)
			}
			if x["apiVersion"] != "monitoring.coreos.com/v1" {
				t.Errorf("%s apiVersion = %v", d.Kind, x["apiVersion"])
			}
			o.monitoring = append(o.monitoring, x)
		default:
			t.Fatalf("unexpected kind %s (%s)", d.Kind, d.Name)
		}
	}
	return o
}

// relayConfig returns the rendered relay.yaml.
func relayConfig(t *testing.T, o objects) string {
	t.Helper()
	for _, cm := range o.configMaps {
		if v, ok := cm.Data["relay.yaml"]; ok {
			return v
		}
	}
	t.Fatal("no ConfigMap with relay.yaml")
	return ""
}

var envRef = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)`)

// checkConfig runs `relaycar check` on a rendered relay.yaml. Secret files
// the pod would mount are stubbed under a temp dir, and ${VAR}s set to
// dummies, as the Secret would provide them.
func checkConfig(t *testing.T, cfg, secretsMount string) {
	t.Helper()
	dir := t.TempDir()
	stub := filepath.Join(dir, "secrets")
	os.MkdirAll(stub, 0o700)
	text := cfg
	if secretsMount != "" {
		text = strings.ReplaceAll(cfg, secretsMount+"/", stub+"/")
		for _, m := range regexp.MustCompile(regexp.QuoteMeta(stub)+`/([A-Za-z0-9._-]+)`).FindAllStringSubmatch(text, -1) {
			os.WriteFile(filepath.Join(stub, m[1]), []byte("dummy-secret-0123456789abcdef0123456789\n"), 0o600)
		}
	}
	path := filepath.Join(dir, "relay.yaml")
	os.WriteFile(path, []byte(text), 0o600)
	cmd := exec.Command(relaycar, "check", "--config", path)
	cmd.Env = os.Environ()
	for _, m := range envRef.FindAllStringSubmatch(text, -1) {
		// check refuses keys too short to be real ones.
		cmd.Env = append(cmd.Env, m[1]+"=dummy-0123456789abcdef0123456789abcdef")
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("relaycar check on the rendered relay.yaml: %v\n%s\n--- relay.yaml\n%s", err, out, text)
	}
}

// secretFree fails if a credential field of relay.yaml holds a literal
// value instead of a ${VAR} reference.
func secretFree(t *testing.T, cfg string) {
	t.Helper()
	var c struct {
		Upstreams []map[string]any `json:"upstreams"`
	}
	if err := yaml.Unmarshal([]byte(cfg), &c); err != nil {
		t.Fatal(err)
	}
	for i, u := range c.Upstreams {
		for _, k := range []string{"api_key", "password", "secret_access_key", "access_key_id"} {
			if v, ok := u[k].(string); ok && v != "" && !strings.HasPrefix(v, "${") {
				t.Errorf("upstreams[%d].%s holds a literal value in a ConfigMap", i, k)
			}
		}
	}
}

// checkPod asserts the security context, probes, grace period and port-25
// sysctl of a pod template running relaycar.
func checkPod(t *testing.T, spec corev1.PodSpec, cfg string, native bool) {
	t.Helper()
	var c *corev1.Container
	list := spec.Containers
	if native {
		list = spec.InitContainers
	}
	for i := range list {
		if list[i].Name == "relaycar" {
			c = &list[i]
		}
	}
	if c == nil {
		t.Fatalf("no relaycar container (native sidecar: %v)", native)
	}
	if native && (c.RestartPolicy == nil || *c.RestartPolicy != corev1.ContainerRestartPolicyAlways) {
		t.Errorf("native sidecar without restartPolicy: Always")
	}
	sc := c.SecurityContext
	switch {
	case sc == nil:
		t.Fatal("no container securityContext")
	case sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot:
		t.Error("runAsNonRoot is not true")
	case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		t.Error("readOnlyRootFilesystem is not true")
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		t.Error("allowPrivilegeEscalation is not false")
	case sc.Capabilities == nil || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" || len(sc.Capabilities.Add) > 0:
		t.Errorf("capabilities = %+v, want drop [ALL]", sc.Capabilities)
	case sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault:
		t.Error("seccompProfile is not RuntimeDefault")
	}
	probe := func(name string, p *corev1.Probe, path string) {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != path || p.HTTPGet.Port.String() != "admin" {
			t.Errorf("%s probe = %+v, want GET %s on the admin port", name, p, path)
		}
	}
	probe("liveness", c.LivenessProbe, "/healthz")
	probe("readiness", c.ReadinessProbe, "/readyz")
	var smtpPort int32
	for _, p := range c.Ports {
		if p.Name == "smtp" {
			smtpPort = p.ContainerPort
		}
	}
	// Everything the relay writes lives on the spool volume.
	mounted := map[string]bool{}
	for _, m := range c.VolumeMounts {
		mounted[m.MountPath] = true
	}
	// relay.yaml is where --config says: a subPath file, or (reload.inPlace)
	// in a directory mount the kubelet updates.
	cfgPath := configArg(t, *c)
	if !mounted["/var/spool/relaycar"] || !(mounted[cfgPath] || mounted[filepath.Dir(cfgPath)]) {
		t.Errorf("mounts = %v, --config=%s", mounted, cfgPath)
	}
	// `kubectl exec … relaycar queue ls` has no --config and runs in the
	// spool directory: it must find relay.yaml through the environment.
	env := ""
	for _, e := range c.Env {
		if e.Name == "RELAYCAR_CONFIG" {
			env = e.Value
		}
	}
	if env != cfgPath {
		t.Errorf("RELAYCAR_CONFIG = %q, want --config's %s", env, cfgPath)
	}
	var rc struct {
		ShutdownGrace *string `json:"shutdown_grace"`
		Shutdown      struct {
			Grace   string `json:"grace"`
			DrainTo string `json:"drain_to"`
		} `json:"shutdown"`
		Listen struct {
			Address string `json:"address"`
		} `json:"listen"`
		Spool struct {
			Dir      string `json:"dir"`
			MaxBytes string `json:"max_bytes"`
		} `json:"spool"`
	}
	yaml.Unmarshal([]byte(cfg), &rc)
	// Past an emptyDir's sizeLimit the pod is evicted with its spool: the
	// relay must know the limit to stop taking mail before.
	for _, v := range spec.Volumes {
		if v.Name != "relaycar-spool" {
			continue
		}
		if ed := v.EmptyDir; ed != nil && ed.SizeLimit != nil && rc.Spool.MaxBytes != ed.SizeLimit.String() {
			t.Errorf("spool emptyDir sizeLimit %s, relay.yaml spool.max_bytes %q: want them equal", ed.SizeLimit, rc.Spool.MaxBytes)
		}
	}
	if rc.ShutdownGrace != nil {
		t.Errorf("relay.yaml has the old shutdown_grace key (%q); the chart renders shutdown.grace", *rc.ShutdownGrace)
	}
	grace, err := time.ParseDuration(rc.Shutdown.Grace)
	if err != nil {
		t.Fatalf("shutdown.grace %q: %v", rc.Shutdown.Grace, err)
	}
	// With drain_to the drain to the peer takes at most another grace. The
	// countdown starts before the preStop sleep.
	need := grace
	if rc.Shutdown.DrainTo != "" {
		need = 2 * grace
	}
	preStop := preStopSleep(t, *c)
	need += time.Duration(preStop) * time.Second
	if spec.TerminationGracePeriodSeconds == nil {
		t.Error("no terminationGracePeriodSeconds")
	} else if tgps := *spec.TerminationGracePeriodSeconds; time.Duration(tgps)*time.Second <= need {
		t.Errorf("terminationGracePeriodSeconds = %d, want more than %s (preStop sleep %ds, shutdown.grace %s, drain_to %q)", tgps, need, preStop, grace, rc.Shutdown.DrainTo)
	}
	if !strings.HasSuffix(rc.Listen.Address, fmt.Sprintf(":%d", smtpPort)) || !strings.HasPrefix(rc.Spool.Dir, "/var/spool/relaycar/") {
		t.Errorf("relay.yaml listen %q / spool %q do not match the container (port %d)", rc.Listen.Address, rc.Spool.Dir, smtpPort)
	}
	hasSysctl := false
	if psc := spec.SecurityContext; psc != nil {
		for _, s := range psc.Sysctls {
			if s.Name == "net.ipv4.ip_unprivileged_port_start" && s.Value == "25" {
				hasSysctl = true
			}
		}
		if psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
			t.Error("pod runAsNonRoot is not true")
		}
	}
	if (smtpPort == 25) != hasSysctl {
		t.Errorf("SMTP port %d but unprivileged-port sysctl present = %v", smtpPort, hasSysctl)
	}
	volumes := map[string]bool{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = true
	}
	if !volumes["relaycar-config"] {
		t.Error("no relaycar-config volume")
	}
}

// preStopSleep is the seconds of the container's preStop sleep, 0 without
// one. A hook must be the sleep action: the distroless image has no shell
// or sleep binary for an exec hook.
func preStopSleep(t *testing.T, c corev1.Container) int64 {
	t.Helper()
	l := c.Lifecycle
	if l == nil {
		return 0
	}
	if l.PostStart != nil || l.PreStop == nil || l.PreStop.Sleep == nil || l.PreStop.Exec != nil || l.PreStop.HTTPGet != nil || l.PreStop.TCPSocket != nil || l.PreStop.Sleep.Seconds < 1 {
		t.Errorf("lifecycle = %+v, want only a preStop sleep of at least 1 s", l)
		return 0
	}
	return l.PreStop.Sleep.Seconds
}

// relaycarContainer is the relaycar container of a standalone pod.
func relaycarContainer(t *testing.T, spec corev1.PodSpec) corev1.Container {
	t.Helper()
	for _, c := range spec.Containers {
		if c.Name == "relaycar" {
			return c
		}
	}
	t.Fatal("no relaycar container")
	return corev1.Container{}
}

// configArg is the container's --config path.
func configArg(t *testing.T, c corev1.Container) string {
	t.Helper()
	for _, a := range c.Args {
		if p, ok := strings.CutPrefix(a, "--config="); ok {
			return p
		}
	}
	t.Fatalf("no --config in args %v", c.Args)
	return ""
}

func TestLint(t *testing.T) {
	for _, f := range ciValues(t) {
		t.Run(filepath.Base(f), func(t *testing.T) {
			if out, err := helm("lint", "--strict", chartDir(), "-f", f); err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
		})
	}
}

func TestRender(t *testing.T) {
	for _, f := range ciValues(t) {
		t.Run(filepath.Base(f), func(t *testing.T) {
			o := decode(t, render(t, chartDir(), "-f", f))
			cfg := relayConfig(t, o)
			secretFree(t, cfg)
			checkConfig(t, cfg, "/etc/relaycar/secrets")
			if len(o.accounts) != 1 {
				t.Errorf("%d ServiceAccounts", len(o.accounts))
			}
			switch filepath.Base(f) {
			case "standalone-values.yaml":
				if len(o.deployments) != 1 || len(o.statefulsets) != 0 || len(o.services) != 2 || len(o.netpols) != 1 || len(o.pdbs) != 1 {
					t.Fatalf("kinds: %d deploy, %d sts, %d svc, %d netpol, %d pdb", len(o.deployments), len(o.statefulsets), len(o.services), len(o.netpols), len(o.pdbs))
				}
				d := o.deployments[0]
				checkPod(t, d.Spec.Template.Spec, cfg, false)
				if d.Spec.Template.Annotations["checksum/config"] == "" {
					t.Error("no checksum/config annotation: config changes would not roll the pods")
				}
				if o.accounts[0].Annotations["eks.amazonaws.com/role-arn"] == "" {
					t.Error("IRSA annotation missing from the ServiceAccount")
				}
				c := d.Spec.Template.Spec.Containers[0]
				var secret []corev1.EnvVar
				for _, e := range c.Env {
					if e.ValueFrom != nil {
						secret = append(secret, e)
					}
				}
				if len(secret) != 1 || secret[0].ValueFrom.SecretKeyRef == nil || secret[0].ValueFrom.SecretKeyRef.Name != "relaycar-secrets" {
					t.Errorf("secret env = %+v", c.Env)
				}
				np := o.netpols[0]
				from := np.Spec.Ingress[0].From
				if len(from) != 1 || from[0].NamespaceSelector == nil || from[0].PodSelector == nil ||
					from[0].NamespaceSelector.MatchLabels["kubernetes.io/metadata.name"] != "billing" || from[0].PodSelector.MatchLabels["app"] != "legacy-php" {
					t.Errorf("NetworkPolicy from = %+v", from)
				}
				// SMTP and admin on separate Services: exposing SMTP must not
				// expose the queue API.
				for _, svc := range o.services {
					ports := svc.Spec.Ports
					switch {
					case strings.HasSuffix(svc.Name, "-metrics"):
						if len(ports) != 1 || ports[0].Name != "admin" || svc.Spec.Type != corev1.ServiceTypeClusterIP {
							t.Errorf("metrics Service = %+v", svc.Spec)
						}
					case len(ports) != 1 || ports[0].Name != "smtp" || ports[0].Port != 25:
						t.Errorf("SMTP Service ports = %+v", ports)
					}
				}
				if admin := np.Spec.Ingress[1]; len(admin.From) == 0 {
					t.Error("admin port open to every source")
				}
			case "persistence-values.yaml":
				if len(o.statefulsets) != 1 || len(o.deployments) != 0 || len(o.services) != 3 {
					t.Fatalf("kinds: %d sts, %d deploy, %d svc", len(o.statefulsets), len(o.deployments), len(o.services))
				}
				s := o.statefulsets[0]
				checkPod(t, s.Spec.Template.Spec, cfg, false)
				if len(s.Spec.VolumeClaimTemplates) != 1 || s.Spec.VolumeClaimTemplates[0].Name != "relaycar-spool" {
					t.Errorf("volumeClaimTemplates = %+v", s.Spec.VolumeClaimTemplates)
				}
				if *s.Spec.Replicas != 3 || *s.Spec.Template.Spec.TerminationGracePeriodSeconds != 5+45+15 {
					t.Errorf("replicas %d, grace %d", *s.Spec.Replicas, *s.Spec.Template.Spec.TerminationGracePeriodSeconds)
				}
			case "sidecar-values.yaml":
				if len(o.deployments)+len(o.statefulsets)+len(o.services) != 0 || len(o.configMaps) != 1 {
					t.Fatalf("sidecar mode rendered workloads: %+v", o)
				}
				if !strings.Contains(cfg, "address: 127.0.0.1:25") || !strings.Contains(cfg, "- 127.0.0.0/8") || strings.Contains(cfg, "10.0.0.0/8") {
					t.Errorf("sidecar relay.yaml must listen on loopback only:\n%s", cfg)
				}
			case "monitoring-values.yaml":
				if len(o.monitoring) != 2 {
					t.Fatalf("%d monitoring objects", len(o.monitoring))
				}
				var dash *corev1.ConfigMap
				for i := range o.configMaps {
					if _, ok := o.configMaps[i].Data["relaycar.json"]; ok {
						dash = &o.configMaps[i]
					}
				}
				if dash == nil || dash.Labels["grafana_dashboard"] != "1" {
					t.Fatal("no Grafana dashboard ConfigMap with the sidecar label")
				}
				var d struct {
					Panels []struct {
						Targets []struct{ Expr string } `json:"targets"`
					} `json:"panels"`
				}
				if err := json.Unmarshal([]byte(dash.Data["relaycar.json"]), &d); err != nil || len(d.Panels) < 6 {
					t.Fatalf("dashboard JSON: %v, %d panels", err, len(d.Panels))
				}
				rules := fmt.Sprint(o.monitoring)
				for _, alert := range []string{"RelaycarUpstreamBreakerOpen", "RelaycarSpoolGrowing", "RelaycarSpoolOldMessages", "RelaycarDeadLetters", "RelaycarRateLimitSaturated", "RelaycarSharedRateLimitDown", "RelaycarConfigReloadFailed"} {
					if !strings.Contains(rules, alert) {
						t.Errorf("PrometheusRule lacks %s", alert)
					}
				}
			}
		})
	}
}

// The example app chart includes relaycar as a native sidecar through the
// chart's named templates, as a user's own chart would.
func TestSidecarIncludedByAnotherChart(t *testing.T) {
	o := decode(t, render(t, filepath.Join(repoRoot, "examples/kubernetes/legacy-app")))
	if len(o.deployments) != 1 {
		t.Fatalf("%d Deployments", len(o.deployments))
	}
	spec := o.deployments[0].Spec.Template.Spec
	cfg := relayConfig(t, o)
	checkPod(t, spec, cfg, true)
	if len(spec.InitContainers) != 1 || len(spec.Containers) != 1 || spec.Containers[0].Name != "app" {
		t.Errorf("init %d, containers %v", len(spec.InitContainers), spec.Containers)
	}
	secretFree(t, cfg)
	checkConfig(t, cfg, "")
	if !strings.Contains(cfg, "address: 127.0.0.1:25") {
		t.Errorf("sidecar must listen on loopback port 25:\n%s", cfg)
	}
	// Without native sidecars (Kubernetes < 1.29) it is a regular container.
	o = decode(t, render(t, filepath.Join(repoRoot, "examples/kubernetes/legacy-app"), "--set", "relaycar.sidecar.native=false"))
	checkPod(t, o.deployments[0].Spec.Template.Spec, relayConfig(t, o), false)
}

func TestSchemaRejectsBadValues(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--set-string", "replicaCount=two"}, "/replicaCount': got string, want integer"},
		{[]string{"--set", "mode=daemon"}, "/mode': value must be one of 'standalone', 'sidecar'"},
		{[]string{"--set", "replicaCount=-1"}, "/replicaCount'"},
		{[]string{"--set", "smtp.port=70000"}, "/smtp/port'"},
		{[]string{"--set", "replicas=2"}, "additional properties 'replicas' not allowed"},
		{[]string{"--set", "persistence.size=lots"}, "/persistence/size'"},
		// Credentials inline would land in the ConfigMap.
		{[]string{"--set", "config.upstreams[0].name=sg,config.upstreams[0].type=sendgrid,config.upstreams[0].api_key=SG.literal"},
			"config.upstreams[0].api_key: do not put credentials in values"},
	} {
		_, err := helm(append([]string{"template", "rc", chartDir()}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("helm template %v: %v, want an error containing %q", tc.args, err, tc.want)
		}
	}
}

// The default values render and the default relay.yaml needs no secrets.
func TestDefaults(t *testing.T) {
	o := decode(t, render(t, chartDir()))
	cfg := relayConfig(t, o)
	checkConfig(t, cfg, "")
	checkPod(t, o.deployments[0].Spec.Template.Spec, cfg, false)
	if *o.deployments[0].Spec.Replicas != 2 || o.pdbs[0].Spec.MaxUnavailable.IntValue() != 1 {
		t.Error("defaults drifted")
	}
}

// Standalone pods sleep in preStop before SIGTERM: relaycar closes its
// listener at once, while the Service may still send new connections to
// the terminating pod for a few seconds. The sleep comes on top of the
// grace in terminationGracePeriodSeconds; sidecar mode has none (the app
// connects over loopback).
func TestPreStopSleep(t *testing.T) {
	pod := func(t *testing.T, o objects) corev1.PodSpec {
		t.Helper()
		switch {
		case len(o.deployments) == 1:
			return o.deployments[0].Spec.Template.Spec
		case len(o.statefulsets) == 1:
			return o.statefulsets[0].Spec.Template.Spec
		}
		t.Fatal("no workload")
		return corev1.PodSpec{}
	}
	for _, tc := range []struct {
		name        string
		args        []string
		sleep, tgps int64
	}{
		{"default", nil, 5, 5 + 20 + 15},
		{"off", []string{"--set", "lifecycle.preStopSleepSeconds=0"}, 0, 20 + 15},
		{"longer", []string{"--set", "lifecycle.preStopSleepSeconds=12"}, 12, 12 + 20 + 15},
		{"statefulset draining", []string{"-f", filepath.Join(chartDir(), "ci", "persistence-values.yaml"), "--set", "shutdown.drainToService=true"}, 5, 5 + 2*45 + 15},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := decode(t, render(t, chartDir(), tc.args...))
			spec := pod(t, o)
			checkPod(t, spec, relayConfig(t, o), false)
			if got := preStopSleep(t, relaycarContainer(t, spec)); got != tc.sleep || *spec.TerminationGracePeriodSeconds != tc.tgps {
				t.Errorf("preStop sleep %ds, terminationGracePeriodSeconds %d; want %ds, %d", got, *spec.TerminationGracePeriodSeconds, tc.sleep, tc.tgps)
			}
		})
	}
	t.Run("not in sidecar mode", func(t *testing.T) {
		app := filepath.Join(repoRoot, "examples/kubernetes/legacy-app")
		for _, native := range []string{"true", "false"} {
			o := decode(t, render(t, app, "--set", "relaycar.sidecar.native="+native, "--set", "relaycar.lifecycle.preStopSleepSeconds=9"))
			spec := o.deployments[0].Spec.Template.Spec
			for _, c := range append(spec.InitContainers, spec.Containers...) {
				if c.Lifecycle != nil {
					t.Errorf("native %s: container %s has lifecycle %+v", native, c.Name, c.Lifecycle)
				}
			}
			if *spec.TerminationGracePeriodSeconds != 20+15 {
				t.Errorf("native %s: terminationGracePeriodSeconds %d, want 35", native, *spec.TerminationGracePeriodSeconds)
			}
		}
	})
	if _, err := helm("template", "rc", chartDir(), "--set", "lifecycle.preStopSleepSeconds=-1"); err == nil || !strings.Contains(err.Error(), "/lifecycle/preStopSleepSeconds'") {
		t.Errorf("preStopSleepSeconds=-1: %v", err)
	}
}

// Shared rate limits: the chart writes config.redis from the redis values,
// mounts the password from an existing Secret as the password_file, and
// the rendered relay.yaml passes `relaycar check`.
func TestRender_SharedRateLimitRedis(t *testing.T) {
	values := filepath.Join(t.TempDir(), "values.yaml")
	os.WriteFile(values, []byte(`
redis:
  address: redis-master.redis.svc:6379
  passwordSecret: {name: redis-auth, key: redis-password}
config:
  upstreams:
    - name: smarthost
      type: smtp
      address: smtp.example.com:587
      rate_limit: {per_second: 10, burst: 10, shared: true}
  routes:
    - {name: default, upstreams: [smarthost]}
`), 0o600)
	o := decode(t, render(t, chartDir(), "-f", values, "--set", "replicaCount=3"))
	cfg := relayConfig(t, o)
	var c struct {
		Redis map[string]any `json:"redis"`
	}
	if err := yaml.Unmarshal([]byte(cfg), &c); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"address": "redis-master.redis.svc:6379", "password_file": "/etc/relaycar/redis/password",
		"tls": false, "key_prefix": "relaycar", "replicas": float64(3)}
	if fmt.Sprint(c.Redis) != fmt.Sprint(want) {
		t.Errorf("redis = %v, want %v", c.Redis, want)
	}
	checkConfig(t, cfg, "/etc/relaycar/redis")
	spec := o.deployments[0].Spec.Template.Spec
	checkPod(t, spec, cfg, false)
	var vol *corev1.Volume
	for i := range spec.Volumes {
		if spec.Volumes[i].Name == "relaycar-redis" {
			vol = &spec.Volumes[i]
		}
	}
	if vol == nil || vol.Secret == nil || vol.Secret.SecretName != "redis-auth" || len(vol.Secret.Items) != 1 ||
		vol.Secret.Items[0].Key != "redis-password" || vol.Secret.Items[0].Path != "password" {
		t.Fatalf("redis password volume = %+v", vol)
	}
	mounted := false
	for _, m := range spec.Containers[0].VolumeMounts {
		mounted = mounted || (m.Name == "relaycar-redis" && m.MountPath == "/etc/relaycar/redis" && m.ReadOnly)
	}
	if !mounted {
		t.Errorf("redis password not mounted read-only at /etc/relaycar/redis: %+v", spec.Containers[0].VolumeMounts)
	}
	// A literal password would land in the ConfigMap.
	if _, err := helm("template", "rc", chartDir(), "--set", "config.redis.password=hunter2"); err == nil || !strings.Contains(err.Error(), "config.redis.password: do not put credentials in values") {
		t.Errorf("literal config.redis.password: %v", err)
	}
	// Without redis.address the chart adds no redis block and no volume.
	o = decode(t, render(t, chartDir()))
	if strings.Contains(relayConfig(t, o), "redis") {
		t.Errorf("redis block without redis.address:\n%s", relayConfig(t, o))
	}
}

// reload.inPlace: by default a relay.yaml change rolls the pods through the
// checksum/config annotation and relay.yaml is a subPath file; with
// inPlace the annotation is gone and the ConfigMap is a directory mount
// (subPath mounts are never updated by the kubelet), which the relay polls
// every reload.pollInterval.
func TestReloadModes(t *testing.T) {
	type pod struct {
		annotations map[string]string
		spec        corev1.PodSpec
		cfg         string
	}
	standalone := func(t *testing.T, args ...string) []pod {
		o := decode(t, render(t, chartDir(), args...))
		cfg := relayConfig(t, o)
		checkConfig(t, cfg, "")
		var pods []pod
		for _, d := range o.deployments {
			pods = append(pods, pod{d.Spec.Template.Annotations, d.Spec.Template.Spec, cfg})
		}
		for _, s := range o.statefulsets {
			pods = append(pods, pod{s.Spec.Template.Annotations, s.Spec.Template.Spec, cfg})
		}
		if len(pods) != 1 {
			t.Fatalf("%d workloads", len(pods))
		}
		return pods
	}
	mount := func(c corev1.Container) corev1.VolumeMount {
		for _, m := range c.VolumeMounts {
			if m.Name == "relaycar-config" {
				return m
			}
		}
		t.Fatalf("no relaycar-config mount: %+v", c.VolumeMounts)
		return corev1.VolumeMount{}
	}
	hasArg := func(c corev1.Container, want string) bool {
		for _, a := range c.Args {
			if a == want {
				return true
			}
		}
		return false
	}

	t.Run("default rolls on change", func(t *testing.T) {
		for _, p := range append(standalone(t), standalone(t, "--set", "persistence.enabled=true")...) {
			checkPod(t, p.spec, p.cfg, false)
			if p.annotations["checksum/config"] == "" {
				t.Error("no checksum/config annotation: config changes would not roll the pods")
			}
			c := relaycarContainer(t, p.spec)
			m := mount(c)
			if configArg(t, c) != "/etc/relaycar/relay.yaml" || m.MountPath != "/etc/relaycar/relay.yaml" || m.SubPath != "relay.yaml" || !m.ReadOnly {
				t.Errorf("--config %s, mount %+v", configArg(t, c), m)
			}
			if !hasArg(c, "--reload-poll=5s") {
				t.Errorf("args %v lack --reload-poll=5s", c.Args)
			}
		}
		// The checksum follows relay.yaml.
		a := standalone(t)[0].annotations["checksum/config"]
		b := standalone(t, "--set", "config.spool.workers=4")[0].annotations["checksum/config"]
		if a == b {
			t.Error("checksum/config did not change with config")
		}
	})

	t.Run("inPlace", func(t *testing.T) {
		for _, p := range append(standalone(t, "--set", "reload.inPlace=true,reload.pollInterval=30s,podAnnotations.team=mail"),
			standalone(t, "--set", "reload.inPlace=true,reload.pollInterval=30s,podAnnotations.team=mail,persistence.enabled=true")...) {
			checkPod(t, p.spec, p.cfg, false)
			if _, ok := p.annotations["checksum/config"]; ok || p.annotations["team"] != "mail" {
				t.Errorf("annotations = %v, want podAnnotations only", p.annotations)
			}
			c := relaycarContainer(t, p.spec)
			m := mount(c)
			if configArg(t, c) != "/etc/relaycar/config/relay.yaml" || m.MountPath != "/etc/relaycar/config" || m.SubPath != "" || !m.ReadOnly {
				t.Errorf("--config %s, mount %+v: want relay.yaml in a directory mount (no subPath)", configArg(t, c), m)
			}
			if !hasArg(c, "--reload-poll=30s") {
				t.Errorf("args %v lack --reload-poll=30s", c.Args)
			}
		}
		// Nothing else to annotate: no annotations at all.
		if p := standalone(t, "--set", "reload.inPlace=true")[0]; len(p.annotations) != 0 {
			t.Errorf("annotations = %v", p.annotations)
		}
	})

	t.Run("sidecar in another chart", func(t *testing.T) {
		app := filepath.Join(repoRoot, "examples/kubernetes/legacy-app")
		o := decode(t, render(t, app))
		if o.deployments[0].Spec.Template.Annotations["checksum/config"] == "" {
			t.Error("the app chart's pods do not roll on a relay.yaml change by default")
		}
		o = decode(t, render(t, app, "--set", "relaycar.reload.inPlace=true"))
		tpl := o.deployments[0].Spec.Template
		if _, ok := tpl.Annotations["checksum/config"]; ok {
			t.Errorf("annotations = %v with reload.inPlace", tpl.Annotations)
		}
		checkPod(t, tpl.Spec, relayConfig(t, o), true)
		if m := mount(tpl.Spec.InitContainers[0]); m.MountPath != "/etc/relaycar/config" || m.SubPath != "" {
			t.Errorf("sidecar config mount %+v", m)
		}
	})

	t.Run("schema", func(t *testing.T) {
		for _, v := range []string{"5x", "soon", "-1s", "3"} {
			if _, err := helm("template", "rc", chartDir(), "--set", "reload.pollInterval="+v); err == nil || !strings.Contains(err.Error(), "/reload/pollInterval'") {
				t.Errorf("reload.pollInterval=%s: %v", v, err)
			}
		}
		for _, set := range []string{"--set", "--set-string"} {
			out, err := helm("template", "rc", chartDir(), set, "reload.pollInterval=0")
			if err != nil || !strings.Contains(out, "- --reload-poll=0\n") {
				t.Errorf("reload.pollInterval=0 (SIGHUP only) with %s: %v", set, err)
			}
		}
		if _, err := helm("template", "rc", chartDir(), "--set", "reload.inplace=true"); err == nil || !strings.Contains(err.Error(), "additional properties 'inplace' not allowed") {
			t.Errorf("reload.inplace typo: %v", err)
		}
	})
}

// shutdown.drainToService: standalone pods drain what is left after the
// grace to the release's own SMTP Service (a terminating pod has left its
// endpoints, so that is a surviving replica), and get time for it.
func TestDrainToService(t *testing.T) {
	type result struct {
		drainTo, grace string
		oldKey         bool
		tgps           int64
		o              objects
		cfg            string
	}
	get := func(t *testing.T, chart string, args ...string) result {
		t.Helper()
		o := decode(t, render(t, chart, args...))
		cfg := relayConfig(t, o)
		var c map[string]any
		if err := yaml.Unmarshal([]byte(cfg), &c); err != nil {
			t.Fatal(err)
		}
		r := result{o: o, cfg: cfg}
		_, r.oldKey = c["shutdown_grace"]
		if s, ok := c["shutdown"].(map[string]any); ok {
			r.drainTo, _ = s["drain_to"].(string)
			r.grace, _ = s["grace"].(string)
		}
		var spec corev1.PodSpec
		switch {
		case len(o.deployments) == 1:
			spec = o.deployments[0].Spec.Template.Spec
		case len(o.statefulsets) == 1:
			spec = o.statefulsets[0].Spec.Template.Spec
		default:
			t.Fatal("no workload")
		}
		checkPod(t, spec, cfg, len(spec.InitContainers) > 0)
		r.tgps = *spec.TerminationGracePeriodSeconds
		return r
	}
	smtpService := func(t *testing.T, o objects) string {
		for _, s := range o.services {
			if len(s.Spec.Ports) == 1 && s.Spec.Ports[0].Name == "smtp" && s.Spec.ClusterIP != "None" {
				return fmt.Sprintf("%s.mail.svc.cluster.local:%d", s.Name, s.Spec.Ports[0].Port)
			}
		}
		t.Fatal("no SMTP Service")
		return ""
	}

	t.Run("off by default", func(t *testing.T) {
		r := get(t, chartDir())
		if r.drainTo != "" || r.grace != "20s" || r.oldKey || r.tgps != 5+20+15 {
			t.Errorf("drain_to %q, grace %q, shutdown_grace present %v, terminationGracePeriodSeconds %d; want none, 20s, false, 5 + 20 + 15", r.drainTo, r.grace, r.oldKey, r.tgps)
		}
	})
	t.Run("deployment", func(t *testing.T) {
		r := get(t, chartDir(), "--set", "shutdown.drainToService=true")
		if want := smtpService(t, r.o); r.drainTo != want || r.drainTo != "rc-relaycar.mail.svc.cluster.local:25" {
			t.Errorf("drain_to = %q, want the SMTP Service %q", r.drainTo, want)
		}
		if r.tgps != 5+2*20+15 {
			t.Errorf("terminationGracePeriodSeconds = %d, want 5 (preStop) + 2 x 20 + 15", r.tgps)
		}
		checkConfig(t, r.cfg, "")
	})
	t.Run("statefulset on 2525", func(t *testing.T) {
		r := get(t, chartDir(), "-f", filepath.Join(chartDir(), "ci", "persistence-values.yaml"),
			"--set", "shutdown.drainToService=true,clusterDomain=k8s.example", "--set", "service.port=2526")
		if r.drainTo != "rc-relaycar.mail.svc.k8s.example:2526" || r.grace != "45s" || r.tgps != 5+2*45+15 {
			t.Errorf("drain_to %q grace %q terminationGracePeriodSeconds %d", r.drainTo, r.grace, r.tgps)
		}
		checkConfig(t, r.cfg, "")
	})
	t.Run("the old shutdown_grace key is replaced", func(t *testing.T) {
		r := get(t, chartDir(), "--set", "config.shutdown_grace=99s,shutdownGraceSeconds=7")
		if r.oldKey || r.grace != "7s" || r.tgps != 5+7+15 {
			t.Errorf("shutdown_grace present %v, grace %q, terminationGracePeriodSeconds %d", r.oldKey, r.grace, r.tgps)
		}
		checkConfig(t, r.cfg, "")
	})
	t.Run("network policy admits the peers", func(t *testing.T) {
		args := []string{"-f", filepath.Join(chartDir(), "ci", "standalone-values.yaml")}
		self := func(o objects) bool {
			for _, f := range o.netpols[0].Spec.Ingress[0].From {
				if f.NamespaceSelector == nil && f.PodSelector != nil && f.PodSelector.MatchLabels["app.kubernetes.io/instance"] == "rc" &&
					f.PodSelector.MatchLabels["app.kubernetes.io/name"] == "relaycar" {
					return true
				}
			}
			return false
		}
		if self(get(t, chartDir(), args...).o) {
			t.Error("the relay's own pods are admitted without drainToService")
		}
		r := get(t, chartDir(), append(args, "--set", "shutdown.drainToService=true")...)
		if !self(r.o) {
			t.Errorf("NetworkPolicy SMTP from = %+v: the draining pod could not reach its peers", r.o.netpols[0].Spec.Ingress[0].From)
		}
		checkConfig(t, r.cfg, "/etc/relaycar/secrets")
		// The peers must also pass listen.allowed_networks: the default
		// covers the private and CGNAT ranges pod networks use.
		var c struct {
			Listen struct {
				AllowedNetworks []string `json:"allowed_networks"`
			} `json:"listen"`
		}
		yaml.Unmarshal([]byte(r.cfg), &c)
		for _, want := range []string{"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"} {
			if !strings.Contains(fmt.Sprint(c.Listen.AllowedNetworks), want) {
				t.Errorf("allowed_networks %v lacks %s", c.Listen.AllowedNetworks, want)
			}
		}
	})
	t.Run("refused", func(t *testing.T) {
		app := filepath.Join(repoRoot, "examples/kubernetes/legacy-app")
		for _, tc := range []struct {
			chart string
			args  []string
			want  string
		}{
			// Sidecar mode has no Service of its own to drain to.
			{chartDir(), []string{"-f", filepath.Join(chartDir(), "ci", "sidecar-values.yaml"), "--set", "shutdown.drainToService=true"}, "shutdown.drainToService needs mode: standalone"},
			{app, []string{"--set", "relaycar.shutdown.drainToService=true"}, "shutdown.drainToService needs mode: standalone"},
			{chartDir(), []string{"--set", "shutdown.drainToService=true,config.shutdown.drain_to=other.mail.svc:25"}, "set either shutdown.drainToService or config.shutdown.drain_to"},
			{chartDir(), []string{"--set", "shutdown.drainToService=true,config.listen.auth.users_file=/etc/relaycar/secrets/users"}, "cannot be used with config.listen.auth.users_file"},
			{chartDir(), []string{"--set", "shutdown.drainToService=true,shutdownGraceSeconds=0"}, "needs shutdownGraceSeconds of at least 1"},
			{chartDir(), []string{"--set", "shutdown.drainToService=yes"}, "/shutdown/drainToService'"},
		} {
			_, err := helm(append([]string{"template", "rc", tc.chart, "--namespace", "mail"}, tc.args...)...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("helm template %v: %v, want an error containing %q", tc.args, err, tc.want)
			}
		}
	})
	t.Run("sidecar draining to a standalone relay", func(t *testing.T) {
		// The sidecar's own drain_to (to a standalone relaycar) gets the
		// longer grace period in the app's pod too.
		r := get(t, filepath.Join(repoRoot, "examples/kubernetes/legacy-app"), "--set", "relaycar.config.shutdown.drain_to=relay-relaycar.mail.svc.cluster.local:25")
		if r.drainTo != "relay-relaycar.mail.svc.cluster.local:25" || r.tgps != 55 {
			t.Errorf("drain_to %q, terminationGracePeriodSeconds %d", r.drainTo, r.tgps)
		}
		checkConfig(t, r.cfg, "")
	})
}
