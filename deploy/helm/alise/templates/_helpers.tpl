{{/* Names and labels shared by every ALISE object. */}}
{{/* release "prod" -> "prod-alise"; a release already named for the chart ("alise", "alise-prod") keeps its name */}}
{{- define "alise.fullname" -}}
{{- if contains "alise" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-alise" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "alise.labels" -}}
app.kubernetes.io/name: alise
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "alise.selector" -}}
app.kubernetes.io/name: alise
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "alise.image" -}}
{{- printf "%s/alise-%s:%s" .root.Values.image.registry .component .root.Values.image.tag -}}
{{- end -}}

{{/* The in-cluster Redis URL carries $(REDIS_PASSWORD), which Kubernetes expands from the env below. */}}
{{- define "alise.redisUrl" -}}
{{- if .Values.redis.externalUrl -}}
{{- .Values.redis.externalUrl -}}
{{- else -}}
{{- printf "redis://:$(REDIS_PASSWORD)@%s-redis:6379/0" (include "alise.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "alise.redisPasswordEnv" -}}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingPasswordSecret | default (printf "%s-secrets" (include "alise.fullname" .)) }}
      key: redis-password
{{- end }}
{{- end -}}

{{/* The internal service token, mounted as a file at /etc/alise/service-token/service-token. */}}
{{- define "alise.serviceTokenVolume" -}}
- name: service-token
  secret:
    secretName: {{ .Values.auth.existingServiceTokenSecret | default (printf "%s-secrets" (include "alise.fullname" .)) }}
    items: [{key: service-token, path: service-token}]
{{- end -}}

{{- define "alise.serviceTokenMount" -}}
- {name: service-token, mountPath: /etc/alise/service-token, readOnly: true}
{{- end -}}


{{/* TLS: where each service's tls.crt, tls.key and ca.crt come from (mounted at /etc/alise/tls), one of:
- "shared": tls.existingSecret, one Secret for every service (no identity check between services);
- "own": tls.existingSecrets, one per service;
- "legacy": the one generated certificate of chart versions before per-service certificates, found in the running
  release (<fullname>-tls without the alise.io/cert-name annotation): kept as it is, used as "shared", so an upgrade
  changes no CA; delete that Secret and upgrade again to move to "generated" (NOTES.txt says so);
- "generated": one CA and a certificate per service (secrets.yaml).
Values read with defaults: `helm upgrade --reuse-values` from an older release has no existingSecrets or certNames. */}}
{{- define "alise.tlsMode" -}}
{{- $v := .Values.tls -}}
{{- $own := $v.existingSecrets | default dict -}}
{{- if $v.existingSecret -}}shared
{{- else if $own.scheduler -}}own
{{- else -}}
{{- $found := lookup "v1" "Secret" .Release.Namespace (printf "%s-tls" (include "alise.fullname" .)) | default dict -}}
{{- if and $found.data (not (hasKey ($found.metadata.annotations | default dict) (include "alise.certNameKey" .))) -}}legacy
{{- else -}}generated
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Secret a service mounts: (dict "root" . "service" "scheduler"). The scheduler's generated one keeps the
chart's first name, <fullname>-tls: clients read ca.crt from it. */}}
{{- define "alise.tlsSecretName" -}}
{{- $mode := include "alise.tlsMode" .root -}}
{{- $fn := include "alise.fullname" .root -}}
{{- if eq $mode "shared" -}}{{ .root.Values.tls.existingSecret }}
{{- else if eq $mode "own" -}}{{ get .root.Values.tls.existingSecrets .service }}
{{- else if or (eq $mode "legacy") (eq .service "scheduler") -}}{{ $fn }}-tls
{{- else -}}{{ $fn }}-tls-{{ .service }}
{{- end -}}
{{- end -}}

{{/* Whether each service has a certificate of its own, so that under mTLS the worker gateway and the predictor can
check whose certificate a caller presents. */}}
{{- define "alise.tlsPerService" -}}
{{- if has (include "alise.tlsMode" .) (list "own" "generated") }}true{{ end -}}
{{- end -}}

{{/* The annotation on a generated TLS Secret that names its certificate (tells this chart's Secrets from those of
versions before per-service certificates, and a changed tls.certNames from an unchanged one). */}}
{{- define "alise.certNameKey" -}}alise.io/cert-name{{- end -}}

{{/* A service's certificate name (Common Name): (dict "root" . "service" "worker"). The fallback repeats values.yaml's
defaults for `helm upgrade --reuse-values` from a release whose values have no tls.certNames. */}}
{{- define "alise.certName" -}}
{{- get (.root.Values.tls.certNames | default dict) .service | default (printf "alise-%s" .service) -}}
{{- end -}}

{{- define "alise.tlsVolume" -}}
{{- if .root.Values.tls.enabled }}
- name: tls
  secret: {secretName: {{ include "alise.tlsSecretName" . }}}
{{- end }}
{{- end -}}

{{- define "alise.tlsMount" -}}
{{- if .Values.tls.enabled }}
- {name: tls, mountPath: /etc/alise/tls, readOnly: true}
{{- end }}
{{- end -}}

{{/* Flags of a service that serves TLS (scheduler, predictor); `mtlsFlag` turns on client certificates and, with a
certificate per service, `namesFlag` names the service whose certificate callers must present (`caller`). */}}
{{- define "alise.tlsServerArgs" -}}
{{- if .root.Values.tls.enabled }}
- --tls-cert=/etc/alise/tls/tls.crt
- --tls-key=/etc/alise/tls/tls.key
- --tls-ca=/etc/alise/tls/ca.crt
- --health-listen=0.0.0.0:{{ .healthPort }}
{{- if .root.Values.tls.mtls }}
- {{ .mtlsFlag }}
{{- if include "alise.tlsPerService" .root }}
- {{ .namesFlag }}={{ include "alise.certName" (dict "root" .root "service" .caller) }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}


{{/* Pod Security "restricted": the pod's and each container's securityContext (values.yaml). Redis runs as the
redis image's own user. */}}
{{- define "alise.podSecurity" -}}
securityContext: {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{- define "alise.containerSecurity" -}}
securityContext: {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end -}}

{{/* The root filesystem is read-only: HOME, the model / kernel caches and Python's temp files go to /tmp. */}}
{{- define "alise.writableEnv" -}}
- {name: HOME, value: /tmp}
- {name: ALISE_CACHE, value: /tmp/alise}
- {name: XDG_CACHE_HOME, value: /tmp/.cache}
- {name: TRITON_CACHE_DIR, value: /tmp/triton}
- {name: PYTHONDONTWRITEBYTECODE, value: "1"}
{{- end -}}

{{- define "alise.tmpVolume" -}}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "alise.tmpMount" -}}
- {name: tmp, mountPath: /tmp}
{{- end -}}

{{/* Spread a component's replicas over nodes where the cluster allows it. */}}
{{- define "alise.spread" -}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels: {{- include "alise.selector" . | nindent 8 }}
{{- end -}}


{{/* The model at worker.modelPath: a PVC, or an emptyDir the init container below fills from the Hub. */}}
{{- define "alise.modelVolume" -}}
- name: models
  {{- if eq .Values.worker.modelSource "hub" }}
  emptyDir: {sizeLimit: {{ .Values.worker.hubCacheSize }}}
  {{- else }}
  persistentVolumeClaim: {claimName: {{ .Values.worker.modelPvc }}}
  {{- end }}
{{- end -}}

{{/* Downloads the model from the Hugging Face Hub before the service starts (worker.modelSource: hub).
`patterns`: what to fetch (the scheduler needs the tokenizer only). */}}
{{- define "alise.modelInit" -}}
{{- $w := .root.Values.worker }}
{{- if eq $w.modelSource "hub" }}
initContainers:
  - name: fetch-model
    image: {{ include "alise.image" (dict "root" .root "component" .component) }}
    imagePullPolicy: {{ .root.Values.image.pullPolicy }}
    {{- include "alise.containerSecurity" .root | nindent 4 }}
    command: ["python", "-c", "import sys, json; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], revision=sys.argv[2], local_dir=sys.argv[3], allow_patterns=json.loads(sys.argv[4]) or None)",
              {{ $w.hubModelId | quote }}, {{ $w.hubRevision | quote }}, {{ $w.modelPath | quote }}, {{ .patterns | toJson | quote }}]
    env:
      {{- include "alise.writableEnv" .root | nindent 6 }}
      - {name: HF_HUB_OFFLINE, value: "0"}
      {{- if $w.hubTokenSecret }}
      - name: HF_TOKEN
        valueFrom: {secretKeyRef: {name: {{ $w.hubTokenSecret }}, key: token}}
      {{- end }}
    volumeMounts:
      {{- include "alise.tmpMount" .root | nindent 6 }}
      - {name: models, mountPath: /models}
{{- end }}
{{- end -}}
