{{/*
Names and labels.
*/}}
{{- define "relaycar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "relaycar.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "relaycar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relaycar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "relaycar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "relaycar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "relaycar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "relaycar.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "relaycar.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The port relaycar listens on for SMTP inside the pod. */}}
{{- define "relaycar.smtpPort" -}}
{{- if .Values.smtp.legacyPort25 -}}25{{- else -}}{{ .Values.smtp.port }}{{- end -}}
{{- end -}}

{{/*
relay.yaml: .Values.config plus the keys the chart owns.
*/}}
{{- define "relaycar.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- /* A ConfigMap is readable by anyone who can read the namespace: refuse literal credentials. */ -}}
{{- range $i, $u := $cfg.upstreams -}}
{{- range $k := list "api_key" "password" "secret_access_key" "access_key_id" -}}
{{- $v := get $u $k | toString -}}
{{- if and $v (ne $v "<nil>") (not (hasPrefix "${" $v)) -}}
{{- fail (printf "config.upstreams[%d].%s: do not put credentials in values (they would land in a ConfigMap); use secrets.env with ${VAR} or secrets.files with %s_file" $i $k $k) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with get $cfg "redis" -}}
{{- $v := get . "password" | toString -}}
{{- if and $v (ne $v "<nil>") (not (hasPrefix "${" $v)) -}}
{{- fail "config.redis.password: do not put credentials in values (they would land in a ConfigMap); use redis.passwordSecret" -}}
{{- end -}}
{{- end -}}
{{- with .Values.redis.address -}}
{{- $r := get $cfg "redis" | default dict -}}
{{- $_ := set $r "address" . -}}
{{- $_ := set $r "tls" $.Values.redis.tls -}}
{{- $_ := set $r "key_prefix" $.Values.redis.keyPrefix -}}
{{- $replicas := int $.Values.redis.replicas -}}
{{- if lt $replicas 1 -}}
{{- $replicas = ternary (int $.Values.replicaCount) 1 (eq $.Values.mode "standalone") -}}
{{- end -}}
{{- $_ := set $r "replicas" (max $replicas 1) -}}
{{- if $.Values.redis.passwordSecret.name -}}
{{- $_ := set $r "password_file" "/etc/relaycar/redis/password" -}}
{{- end -}}
{{- $_ := set $cfg "redis" $r -}}
{{- end -}}
{{- $listen := get $cfg "listen" | default dict -}}
{{- if eq .Values.mode "sidecar" -}}
{{- /* Only the app in the same pod connects, over loopback. */ -}}
{{- $_ := set $listen "address" (printf "127.0.0.1:%s" (include "relaycar.smtpPort" .)) -}}
{{- $_ := set $listen "allowed_networks" (list "127.0.0.0/8" "::1/128") -}}
{{- else -}}
{{- /* All addresses, IPv4 and IPv6. */ -}}
{{- $_ := set $listen "address" (printf ":%s" (include "relaycar.smtpPort" .)) -}}
{{- end -}}
{{- $_ := set $cfg "listen" $listen -}}
{{- $_ := set $cfg "admin" (dict "address" (printf ":%d" (int .Values.admin.port))) -}}
{{- $spool := get $cfg "spool" | default dict -}}
{{- $_ := set $spool "dir" "/var/spool/relaycar/queue" -}}
{{- /* Past an emptyDir's sizeLimit the kubelet evicts the pod at once,
  spool and all: relaycar stops taking mail (452) before it. */ -}}
{{- if and (not (and (eq .Values.mode "standalone") .Values.persistence.enabled)) .Values.spoolSizeLimit (not (hasKey $spool "max_bytes")) -}}
{{- $_ := set $spool "max_bytes" (toString .Values.spoolSizeLimit) -}}
{{- end -}}
{{- $_ := set $cfg "spool" $spool -}}
{{- /* shutdown.grace (relaycar reads the older shutdown_grace too, but
  not both at once): the chart owns it. */ -}}
{{- $_ := unset $cfg "shutdown_grace" -}}
{{- $shutdown := get $cfg "shutdown" | default dict -}}
{{- $_ := set $shutdown "grace" (printf "%ds" (int .Values.shutdownGraceSeconds)) -}}
{{- with include "relaycar.drainToService" . -}}
{{- $_ := set $shutdown "drain_to" . -}}
{{- end -}}
{{- $_ := set $cfg "shutdown" $shutdown -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/*
shutdown.drainToService: this release's own SMTP Service as
shutdown.drain_to, or "" when off. A terminating pod has left the Service's
endpoints, so the Service reaches a surviving replica.
*/}}
{{- define "relaycar.drainToService" -}}
{{- if .Values.shutdown.drainToService -}}
{{- if ne .Values.mode "standalone" -}}
{{- fail "shutdown.drainToService needs mode: standalone: in sidecar mode this release has no SMTP Service to drain to (set config.shutdown.drain_to to a standalone relaycar Service instead)" -}}
{{- end -}}
{{- if dig "shutdown" "drain_to" "" .Values.config -}}
{{- fail "set either shutdown.drainToService or config.shutdown.drain_to, not both" -}}
{{- end -}}
{{- if dig "listen" "auth" "users_file" "" .Values.config -}}
{{- fail "shutdown.drainToService cannot be used with config.listen.auth.users_file: a draining pod does not AUTH, so its peers would refuse the mail (530)" -}}
{{- end -}}
{{- if lt (int .Values.shutdownGraceSeconds) 1 -}}
{{- fail "shutdown.drainToService needs shutdownGraceSeconds of at least 1: the drain to the peer takes at most one more grace period" -}}
{{- end -}}
{{- printf "%s.%s.svc.%s:%d" (include "relaycar.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.service.port) -}}
{{- end -}}
{{- end -}}

{{/*
The preStop sleep in seconds, 0 for none: standalone only (a Service routes
to the pod; in sidecar mode the app connects over loopback).
*/}}
{{- define "relaycar.preStopSleepSeconds" -}}
{{- if eq .Values.mode "standalone" -}}
{{- dig "preStopSleepSeconds" 0 (.Values.lifecycle | default dict) | int -}}
{{- else -}}
0
{{- end -}}
{{- end -}}

{{/*
terminationGracePeriodSeconds for a pod running relaycar: the preStop sleep
(the countdown starts before it), then the grace plus 15 s, or, when it
drains to a peer (which takes at most another grace), twice the grace plus
15 s.
*/}}
{{- define "relaycar.terminationGracePeriodSeconds" -}}
{{- $grace := int .Values.shutdownGraceSeconds -}}
{{- $preStop := include "relaycar.preStopSleepSeconds" . | int -}}
{{- if or .Values.shutdown.drainToService (dig "shutdown" "drain_to" "" .Values.config) -}}
{{- add $preStop (mul 2 $grace) 15 -}}
{{- else -}}
{{- add $preStop $grace 15 -}}
{{- end -}}
{{- end -}}

{{/* Where relay.yaml is in the container: a subPath file (never updated
  by the kubelet; pods roll on change), or, with reload.inPlace, in a
  directory mount the kubelet updates and the relay polls. */}}
{{- define "relaycar.configPath" -}}
{{- if .Values.reload.inPlace -}}/etc/relaycar/config/relay.yaml{{- else -}}/etc/relaycar/relay.yaml{{- end -}}
{{- end -}}

{{- define "relaycar.configMapName" -}}
{{- printf "%s-config" (include "relaycar.fullname" .) -}}
{{- end -}}

{{/*
Pod-level settings a pod running relaycar needs. Port 25 without root: the
safe sysctl net.ipv4.ip_unprivileged_port_start (Kubernetes >= 1.22).
*/}}
{{- define "relaycar.podSecurityContext" -}}
{{- $psc := deepCopy .Values.podSecurityContext -}}
{{- if .Values.smtp.legacyPort25 -}}
{{- $sysctls := get $psc "sysctls" | default list -}}
{{- $sysctls = append $sysctls (dict "name" "net.ipv4.ip_unprivileged_port_start" "value" "25") -}}
{{- $_ := set $psc "sysctls" $sysctls -}}
{{- end -}}
{{- toYaml $psc -}}
{{- end -}}

{{/*
The relaycar container. Context: the relaycar chart's root context (inside
this chart: "."; from a parent chart: .Subcharts.relaycar).
*/}}
{{- define "relaycar.container" -}}
name: relaycar
image: {{ include "relaycar.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args:
  - serve
  - --config={{ include "relaycar.configPath" . }}
  - --reload-poll={{ .Values.reload.pollInterval }}
  - --log-format={{ .Values.logFormat }}
  - --log-level={{ .Values.logLevel }}
ports:
  - name: smtp
    containerPort: {{ include "relaycar.smtpPort" . }}
    protocol: TCP
  - name: admin
    containerPort: {{ .Values.admin.port }}
    protocol: TCP
env:
  # `kubectl exec … relaycar queue ls` runs in the image's working
  # directory, the spool, where there is no relay.yaml: the CLI finds the
  # config through this.
  - name: RELAYCAR_CONFIG
    value: {{ include "relaycar.configPath" . | quote }}
  {{- range .Values.secrets.env }}
  - name: {{ .name }}
    valueFrom:
      secretKeyRef:
        name: {{ required "secrets.existingSecret is required when secrets.env is set" $.Values.secrets.existingSecret }}
        key: {{ .key }}
  {{- end }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
volumeMounts:
  - name: relaycar-config
    {{- if .Values.reload.inPlace }}
    mountPath: {{ include "relaycar.configPath" . | dir }}
    {{- else }}
    mountPath: {{ include "relaycar.configPath" . }}
    subPath: relay.yaml
    {{- end }}
    readOnly: true
  - name: relaycar-spool
    mountPath: /var/spool/relaycar
  - name: relaycar-outbox
    mountPath: /var/lib/relaycar/outbox
  {{- if .Values.secrets.files }}
  - name: relaycar-secrets
    mountPath: {{ .Values.secrets.mountPath }}
    readOnly: true
  {{- end }}
  {{- if and .Values.redis.address .Values.redis.passwordSecret.name }}
  - name: relaycar-redis
    mountPath: /etc/relaycar/redis
    readOnly: true
  {{- end }}
livenessProbe:
  httpGet: {path: /healthz, port: admin}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: admin}
  periodSeconds: 5
  failureThreshold: 2
# The admin port opens once the spool is loaded, and the load reads and
# checks every message (50,000 of 4 KB took 10.6 s cold on a local SSD):
# five minutes keep a pod with a large backlog on a slow volume from being
# killed before it delivers any of it.
startupProbe:
  httpGet: {path: /healthz, port: admin}
  periodSeconds: 1
  failureThreshold: 300
{{- with include "relaycar.preStopSleepSeconds" . | int }}
# relaycar closes its listener on SIGTERM; the sleep keeps it open until
# the pod has left the Service's endpoints. The sleep action (Kubernetes
# >= 1.30): the image has no shell.
lifecycle:
  preStop:
    sleep:
      seconds: {{ . }}
{{- end }}
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
{{- end -}}

{{/* The container as a Kubernetes native sidecar (init container that keeps running). */}}
{{- define "relaycar.sidecar.initContainer" -}}
{{ include "relaycar.container" . }}
restartPolicy: Always
{{- end -}}

{{/* Volumes the container needs. The spool is an emptyDir unless a StatefulSet claims it. */}}
{{- define "relaycar.volumes" -}}
- name: relaycar-config
  configMap:
    name: {{ include "relaycar.configMapName" . }}
{{- if .Values.secrets.files }}
- name: relaycar-secrets
  secret:
    secretName: {{ required "secrets.existingSecret is required when secrets.files is set" .Values.secrets.existingSecret }}
    defaultMode: 0440
    items:
      {{- range .Values.secrets.files }}
      - key: {{ .key }}
        path: {{ .path }}
      {{- end }}
{{- end }}
{{- if and .Values.redis.address .Values.redis.passwordSecret.name }}
- name: relaycar-redis
  secret:
    secretName: {{ .Values.redis.passwordSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ required "redis.passwordSecret.key is required with redis.passwordSecret.name" .Values.redis.passwordSecret.key }}
        path: password
{{- end }}
{{- if not (and (eq .Values.mode "standalone") .Values.persistence.enabled) }}
- name: relaycar-spool
  emptyDir:
    sizeLimit: {{ .Values.spoolSizeLimit }}
{{- end }}
{{- /* For the file upstream only, and apart from the spool: a full outbox
  must never get the pod evicted with the spool's mail in it. */}}
- name: relaycar-outbox
  emptyDir: {}
{{- end -}}

{{/* Pod annotations: roll pods when relay.yaml changes, unless
  reload.inPlace leaves the change to the running relay. Empty when there
  is nothing to annotate. */}}
{{- define "relaycar.podAnnotations" -}}
{{- $a := deepCopy (.Values.podAnnotations | default dict) -}}
{{- if not .Values.reload.inPlace -}}
{{- $_ := set $a "checksum/config" (include "relaycar.config" . | sha256sum) -}}
{{- end -}}
{{- if $a -}}
{{- toYaml $a -}}
{{- end -}}
{{- end -}}

{{/* The pod spec shared by the Deployment and the StatefulSet. */}}
{{- define "relaycar.podSpec" -}}
serviceAccountName: {{ include "relaycar.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
terminationGracePeriodSeconds: {{ include "relaycar.terminationGracePeriodSeconds" . }}
securityContext:
  {{- include "relaycar.podSecurityContext" . | nindent 2 }}
containers:
  {{- include "relaycar.container" . | indent 2 | trim | printf "- %s" | nindent 2 }}
volumes:
  {{- include "relaycar.volumes" . | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
