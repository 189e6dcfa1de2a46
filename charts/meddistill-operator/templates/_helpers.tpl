{{- define "meddistill.labels" -}}
app.kubernetes.io/name: meddistill-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "meddistill.selectorLabels" -}}
app.kubernetes.io/name: meddistill-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "meddistill.watchNamespace" -}}
{{- if eq .Values.rbac.scope "namespace" -}}{{ .Values.watchNamespace | default .Release.Namespace }}{{- end -}}
{{- end }}

{{/* imagePullSecrets' names, comma-separated (MEDDISTILL_IMAGE_PULL_SECRETS); called with the list. */}}
{{- define "meddistill.pullSecretNames" -}}
{{- $names := list }}{{ range . }}{{ $names = append $names .name }}{{ end }}{{ join "," $names }}
{{- end }}

{{/* Exactly what the operator calls; tests/test_chart_rbac.py drops rules one by one. */}}
{{- define "meddistill.rules" -}}
- apiGroups: ["meddistill.io"]
  resources: ["meddistilljobs"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["meddistill.io"]
  resources: ["meddistilljobs/status"]
  verbs: ["update"]
{{- /* Children carry blockOwnerDeletion: OwnerReferencesPermissionEnforcement (OpenShift and others)
     only lets whoever may update the owner's finalizers set it. */}}
- apiGroups: ["meddistill.io"]
  resources: ["meddistilljobs/finalizers"]
  verbs: ["update"]
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: ["ray.io"]
  resources: ["rayservices"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- /* spec.queueName: the operator checks the job's Kueue LocalQueue exists before it creates a stage. */}}
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["localqueues"]
  verbs: ["list"]
{{- /* kopf peering: the replicas record themselves in the peering object and watch each other. */}}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings", "kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- /* The NetworkPolicy closing each job's Ray heads (get: on a 409 it checks the policy is the job's
     own). No Secret verb: KubeRay makes each Ray cluster's token Secret itself (authOptions). */}}
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "get"]
{{- end }}

