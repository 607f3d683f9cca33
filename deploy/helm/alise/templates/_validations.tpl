{{/* Refuse values that would deploy a broken system, with a message saying which value. */}}
{{- define "alise.validate" -}}
{{- $w := .Values.worker -}}
{{- if not (has .Values.scheduler.policy (list "fcfs" "priority" "sjf" "mlfq" "alise")) -}}
{{- fail (printf "scheduler.policy must be fcfs, priority, sjf, mlfq or alise (got %q)" .Values.scheduler.policy) -}}
{{- end -}}
{{- if not (has .Values.scheduler.preemptMode (list "park" "recompute" "swap")) -}}
{{- fail "scheduler.preemptMode must be park, recompute or swap" -}}
{{- end -}}
{{- if not (has .Values.predictor.encoder (list "auto" "minilm" "static")) -}}
{{- fail (printf "predictor.encoder must be auto, minilm or static (got %q)" .Values.predictor.encoder) -}}
{{- end -}}
{{- if lt (int $w.replicas) 0 -}}
{{- fail "worker.replicas must be >= 0" -}}
{{- end -}}
{{- if le (int $w.terminationGracePeriodSeconds) (add (int $w.drainTimeoutSeconds) (int $w.preStopSleepSeconds)) -}}
{{- fail "worker.terminationGracePeriodSeconds must exceed worker.drainTimeoutSeconds + worker.preStopSleepSeconds, or in-flight jobs are killed mid-drain" -}}
{{- end -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.externalUrl) -}}
{{- fail "set redis.externalUrl when redis.enabled is false" -}}
{{- end -}}
{{- if and (not .Values.auth.tenants) (not .Values.auth.existingApiKeysSecret) -}}
{{- fail "auth.tenants (or auth.existingApiKeysSecret) is required: every client needs an API key. Make one with `python -m services.scheduler.tenants add keys.json NAME` and pass the tenants of keys.json as auth.tenants" -}}
{{- end -}}
{{- range .Values.auth.tenants -}}
{{- if not (regexMatch "^[0-9a-f]{64}$" (.key_sha256 | default "")) -}}
{{- fail (printf "auth.tenants: tenant %q needs key_sha256, the SHA-256 hex digest of its API key" (.name | default "")) -}}
{{- end -}}
{{- end -}}
{{- if not (has $w.modelSource (list "pvc" "hub")) -}}
{{- fail "worker.modelSource must be pvc or hub" -}}
{{- end -}}
{{- if and (eq $w.modelSource "hub") (not $w.hubModelId) -}}
{{- fail "worker.hubModelId is required with worker.modelSource=hub (e.g. meta-llama/Meta-Llama-3-8B-Instruct)" -}}
{{- end -}}
{{- if and .Values.predictor.modelPvc (gt (int .Values.predictor.replicas) 1) -}}
{{- fail "predictor.replicas must be 1 with predictor.modelPvc: each replica saves what it learned to that volume, and replicas would overwrite each other's files (a ReadWriteOnce volume cannot even attach to two nodes)" -}}
{{- end -}}
{{- $own := .Values.tls.existingSecrets | default dict -}}
{{- if and (or $own.scheduler $own.predictor $own.worker) (not (and $own.scheduler $own.predictor $own.worker)) -}}
{{- fail "tls.existingSecrets: name a Secret for each of scheduler, predictor and worker, or for none" -}}
{{- end -}}
{{- if and .Values.tls.existingSecret $own.scheduler -}}
{{- fail "tls.existingSecret (one Secret for every service) and tls.existingSecrets (one per service): set one of them" -}}
{{- end -}}
{{- if not (hasPrefix "/models/" $w.modelPath) -}}
{{- fail (printf "worker.modelPath must be under /models/, where the model volume is mounted (got %q)" $w.modelPath) -}}
{{- end -}}
{{- if ne .Values.scheduler.modelName $w.modelName -}}
{{- fail "scheduler.modelName and worker.modelName must match" -}}
{{- end -}}
{{- end -}}
