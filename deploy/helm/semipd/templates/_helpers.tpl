{{/*
Named templates of the semipd chart. The chart keeps to the template subset that
tests/helm_render.py implements (see its docstring); the tests fail on anything else.
*/}}

{{/* Chart name, or nameOverride. */}}
{{- define "semipd.name" -}}
{{- default .Chart.Name .Values.nameOverride -}}
{{- end -}}

{{/* Name of the RayService and prefix of every object: fullnameOverride, else the
release name when it already is the chart name, else <release>-<chart>. */}}
{{- define "semipd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride -}}
{{- else if eq .Release.Name (include "semipd.name" .) -}}
{{- .Release.Name -}}
{{- else -}}
{{- .Release.Name }}-{{ include "semipd.name" . -}}
{{- end -}}
{{- end -}}

{{- define "semipd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "semipd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "semipd.labels" -}}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{ include "semipd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "semipd.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Address of the bundled Redis Service. */}}
{{- define "semipd.redisHost" -}}
{{ include "semipd.fullname" . }}-redis
{{- end -}}

{{/* True (non-empty) when the app's Redis needs a password from a Secret. */}}
{{- define "semipd.redisHasPassword" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.external.passwordSecret.name }}true{{ end -}}
{{- end -}}

{{- define "semipd.redisScheme" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.external.tls }}rediss{{ else }}redis{{ end -}}
{{- end -}}

{{- define "semipd.redisHostPort" -}}
{{- if .Values.redis.enabled -}}
{{ include "semipd.redisHost" . }}:{{ .Values.redis.port }}
{{- else -}}
{{ required "redis.external.address is required when redis.enabled is false" .Values.redis.external.address }}
{{- end -}}
{{- end -}}

{{- define "semipd.redisDb" -}}
{{- if .Values.redis.enabled }}0{{ else }}{{ .Values.redis.external.db }}{{ end -}}
{{- end -}}

{{/* Redis URL of the SLO controller, without any password. */}}
{{- define "semipd.redisUrl" -}}
{{ include "semipd.redisScheme" . }}://{{ include "semipd.redisHostPort" . }}/{{ include "semipd.redisDb" . }}
{{- end -}}

{{/* The Ray Serve config (serveConfigV2, and deploy/examples/serve_config.yaml outside
Kubernetes): one application built by cluster.serve_app:build_app(args). With a Redis
password, redis_url is null and the app reads the URL from SEMIPD_REDIS_URL instead, so
that no secret lands in the RayService. The engine and controller settings that values.yaml leaves
out (semipd.maxModelLen ... semipd.profileGrid) are args only when set: unset, the app's own
defaults apply; so are the size of the app's deployment, semipd-openai (frontend.numReplicas,
maxOngoingRequests, numCpus: the app's args for them), except frontend.autoscaling, which the app
has no arg for: the autoscaling_config of that deployment's entry, applied by Serve over the
code's num_replicas. */}}
{{- define "semipd.serveConfig" -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ .Values.service.ports.serve | toJson }}
applications:
  - name: semipd
    route_prefix: /
    import_path: cluster.serve_app:build_app
    args:
      model: {{ .Values.model.path | toJson }}
      served_model_name: {{ .Values.model.servedName | toJson }}
      tool_call_parser: {{ .Values.model.toolCallParser | toJson }}
      reasoning_parser: {{ if .Values.model.reasoningParser }}{{ .Values.model.reasoningParser | toJson }}{{ else }}null{{ end }}
      ttft_slo_ms: {{ .Values.slo.ttftMs | toJson }}
      tpot_slo_ms: {{ .Values.slo.tpotMs | toJson }}
      prefill_order: {{ .Values.slo.prefillOrder | toJson }}
      admission: {{ .Values.slo.admission | toJson }}
      admission_slack: {{ .Values.slo.admissionSlack | toJson }}
      mode: {{ .Values.semipd.mode | toJson }}
      prefill_sm_min: {{ .Values.semipd.prefillSmMin | toJson }}
      prefill_sm_max: {{ .Values.semipd.prefillSmMax | toJson }}
      router_policy: {{ .Values.router.policy | toJson }}
      num_actors: {{ .Values.semipd.numActors | toJson }}
      redis_url: {{ if include "semipd.redisHasPassword" . }}null{{ else }}{{ include "semipd.redisUrl" . | toJson }}{{ end }}
      api_key_env: {{ if .Values.apiKey.secretName }}{{ .Values.apiKey.env | toJson }}{{ else }}null{{ end }}
      grpc_port: {{ if .Values.grpc.enabled }}{{ .Values.grpc.port | toJson }}{{ else }}null{{ end }}
      page_size: {{ .Values.semipd.pageSize | toJson }}
      max_prefill_tokens: {{ .Values.semipd.maxPrefillTokens | toJson }}
      stream_interval: {{ .Values.semipd.streamInterval | toJson }}
      {{- if hasKey .Values.semipd "maxModelLen" }}
      max_model_len: {{ .Values.semipd.maxModelLen | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "maxDecodeSeqs" }}
      max_decode_seqs: {{ .Values.semipd.maxDecodeSeqs | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "memoryFraction" }}
      memory_fraction: {{ .Values.semipd.memoryFraction | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "numPages" }}
      num_pages: {{ .Values.semipd.numPages | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "enablePrefixCaching" }}
      enable_prefix_caching: {{ .Values.semipd.enablePrefixCaching | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "dtype" }}
      dtype: {{ .Values.semipd.dtype | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "seed" }}
      seed: {{ .Values.semipd.seed | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "loadFormat" }}
      load_format: {{ .Values.semipd.loadFormat | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "prefillSms" }}
      prefill_sms: {{ .Values.semipd.prefillSms | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "overlapDecode" }}
      overlap_decode: {{ .Values.semipd.overlapDecode | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "overlapPrefill" }}
      overlap_prefill: {{ .Values.semipd.overlapPrefill | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "decodePaceMs" }}
      decode_pace_ms: {{ .Values.semipd.decodePaceMs | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "prefillLayersAhead" }}
      prefill_layers_ahead: {{ .Values.semipd.prefillLayersAhead | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "switchIntervalMs" }}
      switch_interval_ms: {{ .Values.semipd.switchIntervalMs | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "decodeAttention" }}
      decode_attention: {{ .Values.semipd.decodeAttention | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "controllerPolicy" }}
      controller_policy: {{ .Values.semipd.controllerPolicy | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "latencyProfile" }}
      latency_profile: {{ .Values.semipd.latencyProfile | toJson }}
      {{- end }}
      {{- if hasKey .Values.semipd "profileGrid" }}
      profile_grid: {{ .Values.semipd.profileGrid | toJson }}
      {{- end }}
      {{- if hasKey .Values.frontend "numReplicas" }}
      num_replicas: {{ .Values.frontend.numReplicas | toJson }}
      {{- end }}
      {{- if hasKey .Values.frontend "maxOngoingRequests" }}
      max_ongoing_requests: {{ .Values.frontend.maxOngoingRequests | toJson }}
      {{- end }}
      {{- if hasKey .Values.frontend "numCpus" }}
      replica_num_cpus: {{ .Values.frontend.numCpus | toJson }}
      {{- end }}
    {{- if hasKey .Values.frontend "autoscaling" }}
    deployments:
      - name: semipd-openai
        autoscaling_config:
          min_replicas: {{ .Values.frontend.autoscaling.minReplicas | toJson }}
          max_replicas: {{ .Values.frontend.autoscaling.maxReplicas | toJson }}
          target_ongoing_requests: {{ .Values.frontend.autoscaling.targetOngoingRequests | toJson }}
    {{- end }}
{{- end -}}

{{/* Environment of every Ray container: secrets by reference, then common.containerEnv.
Starts with an entry that is always there, so `env:` is never empty. SEMIPD_REDIS_URL uses
Kubernetes' $(VAR) expansion of the variable defined just before it. */}}
{{- define "semipd.commonEnv" -}}
- name: PYTHONUNBUFFERED
  value: "1"
{{- if include "semipd.redisHasPassword" . }}
- name: SEMIPD_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.passwordSecret.name | quote }}
      key: {{ required "redis.external.passwordSecret.key is required with a passwordSecret.name" .Values.redis.external.passwordSecret.key | quote }}
- name: SEMIPD_REDIS_URL
  value: "{{ include "semipd.redisScheme" . }}://:$(SEMIPD_REDIS_PASSWORD)@{{ include "semipd.redisHostPort" . }}/{{ include "semipd.redisDb" . }}"
{{- end }}
{{- if .Values.apiKey.secretName }}
- name: {{ .Values.apiKey.env }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKey.secretName | quote }}
      key: {{ required "apiKey.key is required with an apiKey.secretName" .Values.apiKey.key | quote }}
{{- end }}
{{- with .Values.common.containerEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "semipd.headEnv" -}}
{{ include "semipd.commonEnv" . }}
{{- with .Values.head.containerEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "semipd.workerEnv" -}}
{{ include "semipd.commonEnv" . }}
{{- with .Values.worker.containerEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Container ports of every Ray container (names as KubeRay expects them). */}}
{{- define "semipd.commonPorts" -}}
- name: serve
  containerPort: {{ .Values.service.ports.serve }}
- name: metrics
  containerPort: {{ .Values.service.ports.metrics }}
{{- if .Values.grpc.enabled }}
- name: grpc
  containerPort: {{ .Values.grpc.port }}
{{- end }}
{{- end -}}

{{/* The volume named "model", from model.source. */}}
{{- define "semipd.modelVolume" -}}
- name: model
{{- if eq .Values.model.source.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.source.pvc.claimName is required for a pvc source" .Values.model.source.pvc.claimName | quote }}
    readOnly: true
{{- else if eq .Values.model.source.type "hostPath" }}
  hostPath:
    path: {{ required "model.source.hostPath.path is required for a hostPath source" .Values.model.source.hostPath.path | quote }}
    type: Directory
{{- else if eq .Values.model.source.type "emptyDir" }}
  emptyDir:
    {{- with .Values.model.source.emptyDir.sizeLimit }}
    sizeLimit: {{ . | quote }}
    {{- else }} {}
    {{- end }}
{{- else }}
{{- required "model.source.type must be pvc, hostPath or emptyDir" nil }}
{{- end }}
{{- end -}}

{{- define "semipd.modelMount" -}}
- name: model
  mountPath: {{ .Values.model.mountPath | quote }}
  readOnly: true
{{- end -}}

{{/* preStop of a worker: drain the Ray node (Serve moves its replicas, the node takes no
new work), then give in-flight requests drainSeconds. */}}
{{- define "semipd.workerPreStop" -}}
exec:
  command:
    - /bin/sh
    - -c
    - ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message "pod terminating" --deadline-remaining-seconds {{ .Values.terminationGracePeriodSeconds }} || true; sleep {{ .Values.drainSeconds }}
{{- end -}}
