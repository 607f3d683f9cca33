{{/* Names and labels shared by every ALISE object. */}}
{{- define "alise.fullname" -}}
{{- printf "%s-alise" .Release.Name | trunc 50 | trimSuffix "-" -}}
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

{{- define "alise.redisUrl" -}}
{{- if .Values.redis.externalUrl -}}
{{- .Values.redis.externalUrl -}}
{{- else -}}
{{- printf "redis://%s-redis:6379/0" (include "alise.fullname" .) -}}
{{- end -}}
{{- end -}}
