{{/* Names and labels, in the style of the prometheus-community charts. */}}
{{- define "egress-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "egress-sidecar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "egress-sidecar.injectorName" -}}
{{- printf "%s-injector" (include "egress-sidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "egress-sidecar.tlsSecretName" -}}
{{- printf "%s-webhook-tls" (include "egress-sidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "egress-sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "egress-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "egress-sidecar.injectorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "egress-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: injector
{{- end }}

{{/*
The sidecar's values and appVersion, whether the template runs in this chart or in a parent
chart that lists egress-sidecar as a dependency (static injection): there `.Values` is the
parent's, and this chart's coalesced values sit under the "egress-sidecar" key. Returns JSON.
*/}}
{{- define "egress-sidecar.sidecarContext" -}}
{{- $values := .Values }}
{{- $appVersion := .Chart.AppVersion }}
{{- if and (hasKey .Values "egress-sidecar") (hasKey (.Subcharts | default dict) "egress-sidecar") }}
{{- $values = index .Values "egress-sidecar" }}
{{- $appVersion = (index .Subcharts "egress-sidecar").Chart.AppVersion }}
{{- end }}
{{- $mode := $values.sidecar.mode }}
{{- $kube := .Capabilities.KubeVersion.Version }}
{{- if eq $mode "auto" }}
{{- $mode = ternary "native" "fallback" (semverCompare ">=1.29.0-0" $kube) }}
{{- else if and (eq $mode "native") (not (semverCompare ">=1.28.0-0" $kube)) }}
{{- /* The API server would drop restartPolicy from the init container: the app would never start. */}}
{{- fail (printf "sidecar.mode native needs Kubernetes 1.29+ (1.28 with the SidecarContainers feature gate), the cluster is %s: use auto or fallback" $kube) }}
{{- end }}
{{- toJson (dict "values" $values "appVersion" $appVersion "mode" $mode) }}
{{- end }}

{{/*
egress-sidecar.intercept: whether the sidecar config turns TLS interception on (intercept.hosts or
any route's match_hosts lists a name) and its ca_dir. Returns JSON {"enabled": bool, "caDir": path}.
*/}}
{{- define "egress-sidecar.intercept" -}}
{{- $ctx := include "egress-sidecar.sidecarContext" . | fromJson }}
{{- $config := $ctx.values.sidecar.config | default dict }}
{{- $intercept := $config.intercept | default dict }}
{{- $enabled := gt (len ($intercept.hosts | default list)) 0 }}
{{- range ($config.routes | default list) }}
{{- if .match_hosts }}{{ $enabled = true }}{{ end }}
{{- end }}
{{- toJson (dict "enabled" $enabled "caDir" ($intercept.ca_dir | default "/var/run/egress-sidecar/ca")) }}
{{- end }}

{{- define "egress-sidecar.imageRef" -}}
{{- $ctx := include "egress-sidecar.sidecarContext" . | fromJson }}
{{- $image := $ctx.values.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $ctx.appVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
egress-sidecar.container: the sidecar container spec, one YAML mapping. The ONE source of truth:
the injector's settings ConfigMap carries this rendered text and the webhook injects it (plus
per-pod annotation overrides); static users include it in their own pod templates:

  initContainers:          # native mode; in fallback mode put it first under containers:
    - {{- include "egress-sidecar.container" . | nindent 6 }}
  volumes:
    - {{- include "egress-sidecar.volume" . | nindent 6 }}
*/}}
{{- define "egress-sidecar.container" -}}
{{- $ctx := include "egress-sidecar.sidecarContext" . | fromJson }}
{{- $s := $ctx.values.sidecar -}}
name: egress-sidecar
image: {{ include "egress-sidecar.imageRef" . | quote }}
imagePullPolicy: {{ $ctx.values.image.pullPolicy }}
args: [run, --config, /etc/egress-sidecar/config.yaml]
{{- if eq $ctx.mode "native" }}
restartPolicy: Always
{{- end }}
env:
  - name: EGRESS_LISTEN_PORT
    value: {{ $s.listenPort | int | toString | quote }}
  - name: EGRESS_ADMIN_PORT
    value: {{ $s.adminPort | int | toString | quote }}
  - name: EGRESS_DRAIN_GRACE
    value: {{ $s.drainGrace | quote }}
  {{- with $s.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  - name: egress-admin
    containerPort: {{ $s.adminPort | int }}
    protocol: TCP
{{- /* App containers start only once this succeeds (native sidecar ordering, KEP-753). With
interception on, /readyz also needs the CA bundle the app's trust variables name. */}}
startupProbe:
  httpGet: {path: /readyz, port: egress-admin}
  periodSeconds: 1
  timeoutSeconds: 1
  failureThreshold: {{ $s.startupTimeoutSeconds | int }}
readinessProbe:
  httpGet: {path: /readyz, port: egress-admin}
  periodSeconds: 5
  timeoutSeconds: 1
  failureThreshold: 2
livenessProbe:
  httpGet: {path: /healthz, port: egress-admin}
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
{{- if eq $ctx.mode "fallback" }}
{{- /* The kubelet starts the next container only when postStart returns: the app waits for us. */}}
{{- /* All containers get SIGTERM at once in this mode; the sidecar's delays it so the app keeps
its egress while it shuts down (the sidecar then drains for drainGrace). */}}
lifecycle:
  postStart:
    exec:
      command: [python, -m, sidecar.inject.waitready, --timeout, {{ $s.startupTimeoutSeconds | int | toString | quote }}]
  {{- if $s.fallbackPreStopSeconds }}
  preStop:
    exec:
      command: [sleep, {{ $s.fallbackPreStopSeconds | int | toString | quote }}]
  {{- end }}
{{- end }}
resources:
  {{- toYaml $s.resources | nindent 2 }}
securityContext:
  {{- toYaml $s.securityContext | nindent 2 }}
volumeMounts:
  - name: egress-sidecar-config
    mountPath: /etc/egress-sidecar
    readOnly: true
  {{- $intercept := include "egress-sidecar.intercept" . | fromJson }}
  {{- if $intercept.enabled }}
  - name: egress-sidecar-ca
    mountPath: {{ $intercept.caDir }}
  {{- end }}
{{- end }}

{{/*
egress-sidecar.lockContainer: the egress lock's init container (`egress-sidecar lock`), one YAML
mapping. It goes FIRST under initContainers, before the native sidecar: it installs the rules
and exits. The sidecar's UID (exempt from the rules) is its securityContext's runAsUser.

  initContainers:
    - {{- include "egress-sidecar.lockContainer" . | nindent 6 }}
    - {{- include "egress-sidecar.container" . | nindent 6 }}
*/}}
{{- define "egress-sidecar.lockContainer" -}}
{{- $ctx := include "egress-sidecar.sidecarContext" . | fromJson }}
{{- $s := $ctx.values.sidecar -}}
name: egress-sidecar-lock
image: {{ include "egress-sidecar.imageRef" . | quote }}
imagePullPolicy: {{ $ctx.values.image.pullPolicy }}
args: [lock, --config, /etc/egress-sidecar/config.yaml, --uid, {{ $s.securityContext.runAsUser | default 65532 | int | toString | quote }}]
resources:
  {{- toYaml $s.lock.resources | nindent 2 }}
securityContext:
  {{- toYaml $s.lock.securityContext | nindent 2 }}
volumeMounts:
  - name: egress-sidecar-config
    mountPath: /etc/egress-sidecar
    readOnly: true
{{- end }}

{{/* egress-sidecar.volume: the pod volume the container mounts (the config ConfigMap). */}}
{{- define "egress-sidecar.volume" -}}
{{- $ctx := include "egress-sidecar.sidecarContext" . | fromJson -}}
name: egress-sidecar-config
configMap:
  name: {{ $ctx.values.sidecar.configMapName }}
{{- end }}

{{/*
TLS interception (only when the sidecar config turns it on; each renders nothing otherwise):
egress-sidecar.caVolume, the pod volume the sidecar writes its CA certificate and bundle to (never
the key); egress-sidecar.caMount, its read-only mount for app containers; egress-sidecar.trustEnv,
the variables that point the app's TLS libraries at the bundle. Static injection:

  containers:
    - name: app
      env:
        {{- include "egress-sidecar.trustEnv" . | nindent 8 }}
      volumeMounts:
        {{- include "egress-sidecar.caMount" . | nindent 8 }}
  volumes:
    - {{- include "egress-sidecar.volume" . | nindent 6 }}
    {{- include "egress-sidecar.caVolume" . | nindent 4 }}
*/}}
{{- define "egress-sidecar.caVolumeSpec" -}}
name: egress-sidecar-ca
emptyDir:
  medium: Memory
  sizeLimit: 4Mi
{{- end }}

{{- define "egress-sidecar.caVolume" -}}
{{- $intercept := include "egress-sidecar.intercept" . | fromJson }}
{{- if $intercept.enabled -}}
- {{- include "egress-sidecar.caVolumeSpec" . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "egress-sidecar.caMount" -}}
{{- $intercept := include "egress-sidecar.intercept" . | fromJson }}
{{- if $intercept.enabled -}}
- name: egress-sidecar-ca
  mountPath: {{ $intercept.caDir }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "egress-sidecar.trustEnv" -}}
{{- $intercept := include "egress-sidecar.intercept" . | fromJson }}
{{- if $intercept.enabled }}
{{- $bundle := printf "%s/bundle.pem" $intercept.caDir }}
{{- range list "SSL_CERT_FILE" "REQUESTS_CA_BUNDLE" "CURL_CA_BUNDLE" "NODE_EXTRA_CA_CERTS" "GIT_SSL_CAINFO" }}
- name: {{ . }}
  value: {{ $bundle | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
egress-sidecar.proxyEnv: env entries for app containers (static injection), the same the webhook
adds for egress-sidecar.io/set-proxy-env: "true". HTTPS_PROXY too (CONNECT tunnels) unless
sidecar.httpsProxy is false (the webhook's per-pod egress-sidecar.io/set-https-proxy: "false").
*/}}
{{- define "egress-sidecar.proxyEnv" -}}
{{- $ctx := include "egress-sidecar.sidecarContext" . | fromJson }}
{{- $proxy := printf "http://127.0.0.1:%d" ($ctx.values.sidecar.listenPort | int) }}
{{- $noProxy := join "," (uniq $ctx.values.sidecar.noProxy) -}}
- name: HTTP_PROXY
  value: {{ $proxy | quote }}
- name: http_proxy
  value: {{ $proxy | quote }}
{{- if $ctx.values.sidecar.httpsProxy }}
- name: HTTPS_PROXY
  value: {{ $proxy | quote }}
- name: https_proxy
  value: {{ $proxy | quote }}
{{- end }}
- name: NO_PROXY
  value: {{ $noProxy | quote }}
- name: no_proxy
  value: {{ $noProxy | quote }}
{{- end }}

{{/* The sidecar config file: the documented default, or it with .Values.sidecar.config merged over. */}}
{{- define "egress-sidecar.configFile" -}}
{{- $default := .Files.Get "files/default.yaml" }}
{{- $overrides := deepCopy (.Values.sidecar.config | default dict) }}
{{- if .Values.sidecar.policyMode }}
{{- $overrides = mergeOverwrite $overrides (dict "policy" (dict "mode" .Values.sidecar.policyMode)) }}
{{- end }}
{{- if $overrides }}
{{- mergeOverwrite ($default | fromYaml) $overrides | toYaml }}
{{- else }}
{{- $default }}
{{- end }}
{{- end }}

{{/* The injector's settings file (also hashed into the Deployment to roll it on change). */}}
{{- define "egress-sidecar.injectorSettings" -}}
container:
  {{- include "egress-sidecar.container" . | nindent 2 }}
volume:
  {{- include "egress-sidecar.volume" . | nindent 2 }}
noProxy: {{ toJson .Values.sidecar.noProxy }}
prometheusAnnotations: {{ .Values.sidecar.prometheusAnnotations }}
{{- $intercept := include "egress-sidecar.intercept" . | fromJson }}
{{- if $intercept.enabled }}
intercept:
  caDir: {{ $intercept.caDir | quote }}
  volume:
    {{- include "egress-sidecar.caVolumeSpec" . | nindent 4 }}
{{- end }}
lock:
  enabled: {{ .Values.sidecar.lock.enabled }}
  transparentPort: {{ dig "listen" "transparent_port" 15006 (include "egress-sidecar.configFile" . | fromYaml) | toJson }}
  container:
    {{- include "egress-sidecar.lockContainer" . | nindent 4 }}
{{- /* Whether the sidecar config chose policy.metadata: identity (NO_PROXY then gets the
metadata addresses, for pods without the lock). */}}
metadataIdentity: {{ eq (dig "policy" "metadata" "deny" (include "egress-sidecar.configFile" . | fromYaml)) "identity" }}
{{- end }}
